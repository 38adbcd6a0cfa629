"""visor_hf: VISOR (VISion On Request) for LLaVA-OneVision in Hugging Face transformers."""

from .configuration_visor import VisorConfig
from .modeling_visor import VisorCache, VisorForConditionalGeneration, VisorModel
from .processing_visor import VisorProcessor

__all__ = ["VisorConfig", "VisorForConditionalGeneration", "VisorModel", "VisorCache", "VisorProcessor"]
