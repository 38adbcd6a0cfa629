"""vLLM plugin for VISOR (VISion On Request) checkpoints made by `visor_hf`.

vLLM loads `register` through the `vllm.general_plugins` entry point, in every process it starts, so
registering twice must be harmless. It registers:
- the config class for `model_type="visor"` (`VisorServingConfig`: encoder-decoder mode, dense RoPE positions);
- the model class for `VisorForConditionalGeneration`, by its import path so that nothing heavy is imported
  before vLLM asks for it.

Usage (after `pip install -e visor_vllm`):
    from vllm import LLM
    llm = LLM(model="path/to/visor/checkpoint")
"""

ARCHITECTURE = "VisorForConditionalGeneration"


def register() -> None:
    """Make vLLM serve VISOR checkpoints with this package's config and model classes."""
    from vllm import ModelRegistry

    from .config import register_config

    register_config()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "visor_vllm.model:VisorForConditionalGeneration")
