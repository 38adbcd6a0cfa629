"""Token reduction (VISOR-TR packing, VisionZip- and VisPruner-style pruning) on top of VISOR, and the dense baseline."""

import math

import pytest
import torch

from visor_hf import VisorConfig, VisorForConditionalGeneration
from visor_hf.baselines import TokenReducedLlavaOnevision
from visor_hf.modeling_visor import VisorTokenPacker
from visor_hf.testing import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava_onevision_config

from .conftest import perturb_new_parameters
from .test_generation import greedy, single

PRUNING = [{"method": "visionzip", "keep_ratio": 0.25}, {"method": "vispruner", "keep_ratio": 0.4}]


@pytest.fixture(scope="module")
def packed_visor(llava):
    model = VisorForConditionalGeneration.from_llava_onevision(
        llava, cross_attn_layers=[1, 3, 5], self_attn_layers=[1, 4], token_reduction={"method": "pack", "pack_factor": 2}
    ).eval()
    return perturb_new_parameters(model, seed=2)


@pytest.mark.parametrize("setting", [*PRUNING, {"method": "visionzip", "keep_ratio": 1.0}])
def test_keep_ratio_one_is_the_model_without_reduction(visor, batch, setting):
    with torch.no_grad():
        plain = visor(**batch, budget=1).logits
        reduced = visor(**batch, budget=1, token_reduction={**setting, "keep_ratio": 1.0}).logits
    text = batch["input_ids"] != IMAGE_TOKEN_ID
    assert (plain - reduced)[text].abs().max() <= 1e-6


@pytest.mark.parametrize("setting", PRUNING)
def test_pruned_counts_follow_the_ratio_per_tile_and_keep_newlines(visor, batch, setting):
    from visor_hf.configuration_visor import validate_token_reduction

    setting = validate_token_reduction(setting)
    model = visor.model
    with torch.no_grad():
        features, kept = model.reduce_visual_tokens(batch["pixel_values"], batch["image_sizes"], None, setting)
        layout = model.token_layout(batch["image_sizes"], None, None, "cpu")
    for feature, mask, (is_newline, _, base_length) in zip(features, kept, layout):
        grid = ~is_newline & (torch.arange(len(mask)) >= base_length)
        assert int(mask[:base_length].sum()) == math.ceil(base_length * setting["keep_ratio"])
        assert int(mask[grid].sum()) == math.ceil(int(grid.sum()) * setting["keep_ratio"])
        assert bool(mask[is_newline].all()) and int(is_newline.sum()) > 0
        assert feature.shape[0] == int(mask.sum())


@pytest.mark.parametrize("score_layer", [-2, 0])
def test_scores_are_the_attention_each_token_receives_in_the_scoring_layer(visor, batch, score_layer):
    """Against SigLIP's own attention weights (eager, output_attentions): mean over heads and queries."""
    from visor_hf.modeling_visor import VisorModel

    tower = visor.model.vision_tower
    with torch.no_grad():
        _, scores = VisorModel.visual_features_with_scores(visor.model, batch["pixel_values"], batch["image_sizes"], None, score_layer)
        crops = torch.cat([batch["pixel_values"][i, :n] for i, n in enumerate(scores_per_image(visor, batch))])
        implementation = tower.config._attn_implementation
        tower.config._attn_implementation = "eager"
        try:
            attentions = tower(crops, output_attentions=True).attentions
        finally:
            tower.config._attn_implementation = implementation
    expected = attentions[score_layer].mean(dim=(1, 2))  # (crops, heads, queries, keys) -> (crops, keys)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)


def scores_per_image(model, batch) -> list[int]:
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    config = model.config
    return [image_size_to_num_patches(list(size), config.image_grid_pinpoints, config.vision_config.image_size)
            for size in batch["image_sizes"].tolist()]


def test_packing_starts_as_the_mean_of_each_group_and_pads_the_last():
    packer = VisorTokenPacker(hidden_size=4, factor=3)
    tokens = torch.randn(7, 4)
    packed, positions = packer(tokens)
    assert positions.tolist() == [0, 3, 6]
    assert torch.allclose(packed[0], tokens[0:3].mean(0), atol=1e-6)
    assert torch.allclose(packed[1], tokens[3:6].mean(0), atol=1e-6)
    assert torch.allclose(packed[2], tokens[6], atol=1e-6)  # padded with copies of the last token


@pytest.mark.parametrize("setting", PRUNING)
def test_dense_visor_with_pruning_is_llava_with_pruning_at_original_positions(llava, batch, setting):
    """VISOR (all layers, no cross-attention) with pruning equals transformers' LLaVA-OneVision fed the same kept
    tokens at their original positions: the kept tokens keep their RoPE positions and order."""
    dense_visor = VisorForConditionalGeneration.from_llava_onevision(llava, cross_attn_layers=[], self_attn_layers=list(range(6)))
    baseline = TokenReducedLlavaOnevision(llava, setting)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = dense_visor.eval()(**batch, position_ids=positions, token_reduction=setting).logits[:, -1]
        theirs = baseline(**batch).logits[:, -1]
        unreduced = llava(**batch).logits[:, -1]
    assert (ours - theirs).abs().max() <= 1e-4
    assert (theirs - unreduced).abs().max() > 1e-4  # the reduction did change something


@pytest.mark.parametrize("budget", [0, "full", [0, "full"]])
@pytest.mark.parametrize("setting", [PRUNING[0], {"method": "pack", "pack_factor": 2}])
def test_batch_equals_single_and_cached_equals_uncached_with_reduction(visor, packed_visor, batch, budget, setting):
    model = packed_visor if setting["method"] == "pack" else visor
    kwargs = {"token_reduction": setting}
    together = greedy(model, batch, budget, use_cache=True, new_tokens=4, **kwargs)
    uncached = greedy(model, batch, budget, use_cache=False, new_tokens=4, **kwargs)
    assert torch.equal(together.sequences, uncached.sequences)
    for i in range(2):
        alone = single(batch, i)
        sample_budget = budget[i] if isinstance(budget, list) else budget
        expected = greedy(model, alone, sample_budget, use_cache=True, new_tokens=4, **kwargs).sequences
        assert torch.equal(together.sequences[i, batch["input_ids"].shape[1] :], expected[0, alone["input_ids"].shape[1] :])


def test_packing_is_saved_and_trained_like_any_weight(packed_visor):
    names = [n for n, p in packed_visor.named_parameters() if "token_packer" in n]
    assert names == ["model.token_packer.weight"]
    assert packed_visor.model.token_packer.weight.shape == (64, 128)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"method": "visionzip", "keep_ratio": 0.0}, r"keep_ratio=0.0: must be in \(0, 1\]"),
        ({"method": "visionzip", "keep_ratio": 1.5}, r"keep_ratio=1.5: must be in \(0, 1\]"),
        ({"method": "tome", "keep_ratio": 0.5}, "method='tome': allowed methods are"),
        ({"method": "visionzip", "keep_ratio": 0.5, "pack_factor": 2}, "unknown fields"),
        ("fast", "use None/'none' or a dict"),
        ({"method": "pack", "pack_factor": 4}, "pack_factor=4 does not match the trained packing layer"),
    ],
)
def test_bad_reduction_settings_are_clear_errors(packed_visor, batch, setting, message):
    with pytest.raises(ValueError, match=message):
        packed_visor(**batch, token_reduction=setting)


def test_packing_without_a_trained_layer_is_an_error(visor, batch):
    with pytest.raises(ValueError, match="pack_factor=2 does not match the trained packing layer \\(pack factor None\\)"):
        visor(**batch, token_reduction={"method": "pack", "keep_ratio": 0.5})
    with pytest.raises(ValueError, match="needs a trained packing layer"):
        TokenReducedLlavaOnevision(visor, {"method": "pack", "pack_factor": 2})


def test_config_validates_its_default_reduction():
    with pytest.raises(ValueError, match="keep_ratio=2: must be in"):
        VisorConfig.from_llava_onevision_config(
            tiny_llava_onevision_config(), token_reduction={"method": "vispruner", "keep_ratio": 2}
        )
