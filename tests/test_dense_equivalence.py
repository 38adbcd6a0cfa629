"""VISOR at the full budget with every layer in S is LLaVA-OneVision (transformers' own implementation)."""

import pytest
import torch

from visor_hf import VisorForConditionalGeneration
from visor_hf.testing import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava_onevision

from .conftest import IMAGE_SIZES, PROMPT_LENGTHS


def text_positions(inputs):
    return (inputs["input_ids"] != IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("cross_attn_layers", [[], [0, 2, 5], None])
def test_full_budget_matches_llava_onevision(attn_implementation, cross_attn_layers):
    llava = tiny_llava_onevision(attn_implementation=attn_implementation)
    inputs = tiny_inputs(llava, IMAGE_SIZES, PROMPT_LENGTHS)
    assert inputs["pixel_values"].shape[1] > 1, "the batch must exercise anyres with several crops"
    visor = VisorForConditionalGeneration.from_llava_onevision(
        llava, cross_attn_layers=cross_attn_layers, self_attn_layers=list(range(6))
    ).eval()
    with torch.no_grad():
        expected = llava(**inputs).logits
        out = visor(**inputs, budget="full")
    assert out.logits.shape == expected.shape
    mask = text_positions(inputs)
    assert (out.logits - expected).abs()[mask].max() <= 1e-4
    assert out.self_attn_layers == [tuple(range(6))] * 2


def test_full_budget_matches_with_explicit_position_ids(llava, batch):
    visor = VisorForConditionalGeneration.from_llava_onevision(llava, self_attn_layers=list(range(6))).eval()
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = llava(**batch, position_ids=positions).logits
        got = visor(**batch, position_ids=positions).logits
    assert (got - expected).abs()[text_positions(batch)].max() <= 1e-4


def test_grafted_model_keeps_every_llava_weight(llava):
    visor = VisorForConditionalGeneration.from_llava_onevision(llava)
    ours = visor.state_dict()
    for key, tensor in llava.state_dict().items():
        assert torch.equal(ours[key], tensor), key
    new = [k for k in ours if k not in llava.state_dict()]
    assert new and all(".cross_attn." in k or ".router." in k for k in new)
    gates = [t for k, t in ours.items() if k.endswith(".gate")]
    assert gates and all(float(g.abs().max()) == 0.0 for g in gates)


def test_lower_budget_differs_from_dense(llava, batch):
    """Sanity of the comparison itself: skipping self-attention layers changes the logits."""
    visor = VisorForConditionalGeneration.from_llava_onevision(llava, self_attn_layers=list(range(6))).eval()
    with torch.no_grad():
        expected = llava(**batch).logits
        got = visor(**batch, budget=0).logits
    assert (got - expected).abs()[text_positions(batch)].max() > 1e-3


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_full_budget_matches_without_padding(attn_implementation):
    """A single unpadded sample takes the plain-causal fast path of the attention."""
    llava = tiny_llava_onevision(attn_implementation=attn_implementation)
    inputs = tiny_inputs(llava, [(112, 56)], [(4, 6)])
    visor = VisorForConditionalGeneration.from_llava_onevision(llava, self_attn_layers=list(range(6))).eval()
    with torch.no_grad():
        expected = llava(**inputs).logits
        got = visor(**inputs).logits
    assert (got - expected).abs()[text_positions(inputs)].max() <= 1e-4
