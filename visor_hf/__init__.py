"""visor_hf: VISOR (VISion On Request) for LLaVA-OneVision in Hugging Face transformers."""

from .configuration_visor import VisorConfig
from .modeling_visor import VisorCache, VisorForConditionalGeneration, VisorModel

__all__ = ["VisorConfig", "VisorForConditionalGeneration", "VisorModel", "VisorCache"]
