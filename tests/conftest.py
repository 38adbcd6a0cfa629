import pytest
import torch

from visor_hf import VisorForConditionalGeneration
from visor_hf.testing import tiny_inputs, tiny_llava_onevision

# Two samples with images of different aspect ratios (anyres with several crops), left padding.
IMAGE_SIZES = [(56, 112), (112, 112)]
PROMPT_LENGTHS = [(3, 4), (2, 7)]


@pytest.fixture(scope="session")
def llava():
    return tiny_llava_onevision()


@pytest.fixture(scope="session")
def batch(llava):
    return tiny_inputs(llava, IMAGE_SIZES, PROMPT_LENGTHS)


def perturb_new_parameters(model, seed=0):
    """Move every VISOR-only parameter (gates, CPE, cross-attention) away from its identity init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.new_parameters().values():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="session")
def visor(llava):
    """Default placement on the 6-layer tiny model: self-attention layers (1, 4), cross-attention (1, 3, 5)."""
    model = VisorForConditionalGeneration.from_llava_onevision(
        llava, cross_attn_layers=[1, 3, 5], self_attn_layers=[1, 4]
    ).eval()
    return perturb_new_parameters(model)
