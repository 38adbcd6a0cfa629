"""Clear errors for bad input, and the new modules checked against plain PyTorch references."""

import pytest
import torch

from visor_hf import VisorConfig, VisorForConditionalGeneration
from visor_hf.modeling_visor import VisorCPE, VisualLayout
from visor_hf.testing import IMAGE_TOKEN_ID, tiny_llava_onevision_config


def test_visual_token_count_mismatch_is_an_error(visor, batch):
    ids = batch["input_ids"].clone()
    ids[0, -1] = IMAGE_TOKEN_ID  # one placeholder too many
    with pytest.raises(ValueError, match="image placeholder tokens.*visual tokens"):
        visor(**dict(batch, input_ids=ids))


def test_placeholders_without_pixels_is_an_error(visor, batch):
    with pytest.raises(ValueError, match="pixel_values is None"):
        visor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@pytest.mark.parametrize(
    "budget, message",
    [
        ("cheap", "budget='cheap' is not allowed"),
        (7, "no configuration has 7 self-attention layers"),
        ((0, 2), "not one of config.configurations"),
        (1.5, "has type float"),
        (True, "has type bool"),
        ([0], "list of 1 entries for a batch of 2"),
        ("auto", "needs a routing token"),
    ],
)
def test_bad_budget_is_an_error_naming_allowed_values(visor, batch, budget, message):
    with pytest.raises(ValueError, match=message) as error:
        visor(**batch, budget=budget)
    if isinstance(budget, str) and budget != "auto":
        assert "'full'" in str(error.value) and "int k" in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"cross_attn_layers": [1, 6]}, r"cross_attn_layers=\[1, 6\]: indices \[6\] are outside the allowed range 0..5"),
        ({"self_attn_layers": [-1]}, r"self_attn_layers=\[-1\]: indices \[-1\] are outside"),
        ({"self_attn_layers": [2, 2]}, "duplicate layer indices"),
        ({"self_attn_layers": [1, 4], "configurations": [[1], [2]]}, r"\[2\] is not a subset of self_attn_layers"),
        ({"cpe_kernel_size": 4}, "cpe_kernel_size=4: must be a positive odd integer"),
    ],
)
def test_bad_config_is_an_error_naming_field_and_range(overrides, message):
    llava_config = tiny_llava_onevision_config()
    with pytest.raises(ValueError, match=message):
        VisorConfig.from_llava_onevision_config(llava_config, **overrides)


def test_default_placement_is_a_third_of_the_layers_spread_uniformly():
    config = VisorConfig.from_llava_onevision_config(tiny_llava_onevision_config(num_layers=24))
    assert config.cross_attn_layers == [2, 5, 8, 11, 14, 17, 20, 23]
    assert config.self_attn_layers == [1, 4, 7, 10, 13, 16, 19, 22]
    assert [len(c) for c in config.configurations] == list(range(9))
    assert config.configurations[-1] == config.self_attn_layers


def test_cpe_matches_a_convolution_run_on_each_image_alone():
    torch.manual_seed(0)
    cpe = VisorCPE(hidden_size=8, kernel_size=7)
    torch.nn.init.normal_(cpe.weight)
    torch.nn.init.normal_(cpe.bias)
    # Sample 0: image 0 (5 tokens) then image 1 (9 tokens); sample 1: image 2 (6 tokens) then padding.
    x = torch.randn(2, 14, 8)
    image_ids = torch.tensor([[0] * 5 + [1] * 9, [2] * 6 + [-1] * 8])
    out = cpe(x, image_ids)
    assert torch.equal(cpe(x, image_ids, VisualLayout.of(image_ids)), out)  # the layout a prompt computes once
    segments = [(0, slice(0, 5)), (0, slice(5, 14)), (1, slice(0, 6))]
    for sample, span in segments:
        alone = x[sample, span].T.unsqueeze(0)  # (1, H, N): the image's tokens, zero-padded at its borders
        conv = torch.nn.functional.conv1d(alone, cpe.weight, cpe.bias, padding=3, groups=8)
        expected = x[sample, span] + conv[0].T
        assert torch.allclose(out[sample, span], expected, atol=1e-5)


def test_new_parameters_are_what_llava_onevision_lacks_and_start_as_identity(llava, batch):
    """A model initialised by transformers' own init path (no grafting) is LLaVA-OneVision at the full budget once it
    holds LLaVA-OneVision's weights: its new parts, as `new_parameters()` names them, start as identity."""
    config = VisorConfig.from_llava_onevision_config(
        llava.config, cross_attn_layers=[0, 2, 5], self_attn_layers=list(range(6)),
        token_reduction={"method": "pack", "pack_factor": 2},
    )
    config.text_config._attn_implementation = llava.config.text_config._attn_implementation
    model = VisorForConditionalGeneration(config).eval()
    base = llava.state_dict()
    assert set(model.new_parameters()) == set(model.state_dict()) - set(base)
    assert {name.split(".")[1] for name in model.new_parameters()} == {"cross_attn", "router", "token_packer"}
    model.load_state_dict(base, strict=False)
    with torch.no_grad():
        expected = llava(**batch).logits
        got = model(**batch, budget="full", token_reduction="none").logits
    text = (batch["input_ids"] != IMAGE_TOKEN_ID) & batch["attention_mask"].bool()
    assert (got - expected).abs()[text].max() <= 1e-4


def _without_placeholders(batch):
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, 5)
    return dict(batch, input_ids=ids)


# (case, change to the batch, exception type, phrase of its message)
BAD_INPUTS = [
    ("float ids", lambda b: dict(b, input_ids=b["input_ids"].float()), TypeError, "integer tensor"),
    ("1-D ids", lambda b: dict(b, input_ids=b["input_ids"][0], attention_mask=None), ValueError, r"\(batch, length\)"),
    ("empty ids", lambda b: {"input_ids": b["input_ids"][:, :0]}, ValueError, "at least one token"),
    ("mask shape", lambda b: dict(b, attention_mask=b["attention_mask"][:, 1:]), ValueError, "attention_mask has shape"),
    ("embeds shape", lambda b: dict(b, inputs_embeds=torch.zeros(2, 3, 64)), ValueError, "inputs_embeds has shape"),
    ("no image_sizes", lambda b: dict(b, image_sizes=None), ValueError, r"image_sizes must be \(2, 2\)"),
    ("image_sizes shape", lambda b: dict(b, image_sizes=b["image_sizes"][:1]), ValueError, r"image_sizes must be \(2, 2\)"),
    ("image_sizes value", lambda b: dict(b, image_sizes=-b["image_sizes"]), ValueError, "positive heights and widths"),
    ("pixels, no placeholder", _without_placeholders, ValueError, "no image placeholder"),
    ("placeholders, no pixels", lambda b: dict(b, pixel_values=None), ValueError, "pixel_values is None"),
    ("score layer", lambda b: dict(b, token_reduction={"method": "visionzip", "keep_ratio": 0.5, "score_layer": 9}),
     ValueError, r"score_layer=9 is out of range.*\[-2, 1\]"),
    ("budget", lambda b: dict(b, budget=1.5), ValueError, "budget"),
]


@pytest.mark.parametrize("case, change, error, phrase", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(visor, batch, case, change, error, phrase):
    with pytest.raises(error, match=phrase), torch.no_grad():
        visor(**change(dict(batch)))


def test_int32_ids_give_what_int64_ids_give(visor, batch):
    """As dense LLaVA-OneVision, VISOR accepts int32 token ids (some tokenizers and ONNX pipelines produce them)."""
    with torch.no_grad():
        expected = visor(**batch, budget=1).logits
        got = visor(**dict(batch, input_ids=batch["input_ids"].int()), budget=1).logits
    assert torch.equal(got, expected)
