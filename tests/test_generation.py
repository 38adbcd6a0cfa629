"""KV-cached generation: equal to uncached, batch equal to single, cache holds what DESIGN.md says."""

import pytest
import torch

from visor_hf import VisorForConditionalGeneration
from visor_hf.modeling_visor import CACHE_FIELD as CACHE_KW
from visor_hf.testing import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_inputs, tiny_llava_onevision

from .conftest import IMAGE_SIZES, PROMPT_LENGTHS, perturb_new_parameters

BUDGETS = [0, 1, "full"]


def greedy(model, inputs, budget, use_cache, new_tokens=6, **kwargs):
    """Greedy decoding; a generated image or video placeholder would make the uncached forward ask for pixels."""
    return model.generate(
        **inputs, budget=budget, use_cache=use_cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
        suppress_tokens=[IMAGE_TOKEN_ID, VIDEO_TOKEN_ID], **kwargs,
    )


def single(inputs, i):
    """Sample i of a left-padded batch, without its padding."""
    keep = inputs["attention_mask"][i].bool()
    out = {"input_ids": inputs["input_ids"][i : i + 1, keep], "attention_mask": inputs["attention_mask"][i : i + 1, keep]}
    out["pixel_values"] = inputs["pixel_values"][i : i + 1]
    out["image_sizes"] = inputs["image_sizes"][i : i + 1]
    return out


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("budget", BUDGETS + [[0, "full"]])
def test_cached_generation_equals_uncached(attn_implementation, budget):
    """Same tokens, and scores equal to float32 rounding (the cached step multiplies the same numbers in other shapes:
    1.8e-7 measured; 1e-6 allowed)."""
    llava = tiny_llava_onevision(attn_implementation=attn_implementation)
    batch = tiny_inputs(llava, IMAGE_SIZES, PROMPT_LENGTHS)
    visor = perturb_new_parameters(
        VisorForConditionalGeneration.from_llava_onevision(llava, cross_attn_layers=[1, 3, 5], self_attn_layers=[1, 4])
    ).eval()
    cached = greedy(visor, batch, budget, use_cache=True)
    uncached = greedy(visor, batch, budget, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.scores, uncached.scores):
        assert torch.equal(step_cached.isinf(), step_uncached.isinf())  # min_new_tokens masks EOS with -inf
        finite = step_cached.isfinite()
        assert (step_cached - step_uncached)[finite].abs().max() <= 1e-6


@pytest.mark.parametrize("budget", [0, 1, 2, "full", (4,)])
def test_batch_generates_what_each_sample_generates_alone(visor, batch, budget):
    together = greedy(visor, batch, budget, use_cache=True).sequences
    prompt_length = batch["input_ids"].shape[1]
    for i in range(2):
        alone = single(batch, i)
        expected = greedy(visor, alone, budget, use_cache=True).sequences[0, alone["input_ids"].shape[1] :]
        assert torch.equal(together[i, prompt_length:], expected)


def test_mixed_budgets_in_one_batch_match_each_sample_alone(visor, batch):
    with torch.no_grad():
        mixed = visor(**batch, budget=[0, "full"])
        assert mixed.self_attn_layers == [(), (1, 4)]
        for i, budget in enumerate([0, "full"]):
            alone = visor(**single(batch, i), budget=budget)
            assert (mixed.logits[i, -1] - alone.logits[0, -1]).abs().max() <= 1e-4
    sequences = greedy(visor, batch, [0, "full"], use_cache=True).sequences
    for i, budget in enumerate([0, "full"]):
        alone = single(batch, i)
        expected = greedy(visor, alone, budget, use_cache=True).sequences[0, alone["input_ids"].shape[1] :]
        assert torch.equal(sequences[i, batch["input_ids"].shape[1] :], expected)


def test_mixed_budgets_without_padding_match_each_sample_alone(visor, llava):
    """Two prompts of one length and image size: no padding, so the layer a sample skips is hidden from it by the
    mask alone (the unpadded fast path must not be taken at a layer some sample skips)."""
    batch = tiny_inputs(llava, [(112, 112), (112, 112)], [(3, 5), (3, 5)], seed=1)
    assert bool(batch["attention_mask"].all())
    with torch.no_grad():
        mixed = visor(**batch, budget=[0, "full"])
        for i, budget in enumerate([0, "full"]):
            alone = visor(**single(batch, i), budget=budget)
            assert (mixed.logits[i, -1] - alone.logits[0, -1]).abs().max() <= 1e-4


@pytest.mark.parametrize("budget", [1, [0, "full"]])
def test_beam_search_with_the_cache_equals_beam_search_without(visor, batch, budget):
    """Beam search reorders the cache (and the prompt state's per-sample masks) between steps."""
    kwargs = dict(num_beams=2, num_return_sequences=2, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                  pad_token_id=0, budget=budget)
    cached = visor.generate(**batch, use_cache=True, **kwargs)
    uncached = visor.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("budget", [0, 1, [0, "full"]])
def test_several_new_tokens_at_once_continue_the_cache(visor, llava, batch, budget, padded):
    """A cached step with 3 new tokens (as in assisted decoding) gives the logits of one uncached forward over
    prompt + those tokens; without padding no mask tensor is built (the causal offset is attention's own)."""
    inputs = batch if padded else tiny_inputs(llava, [(112, 112), (112, 112)], [(3, 5), (3, 5)], seed=1)
    new = torch.randint(3, IMAGE_TOKEN_ID, (2, 3), generator=torch.Generator().manual_seed(0))
    full_mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
    with torch.no_grad():
        prompt = visor(**inputs, budget=budget, use_cache=True)
        cache = prompt.past_key_values if prompt.past_key_values is not None else prompt.cache
        step = visor(input_ids=new, attention_mask=full_mask, use_cache=True, **{CACHE_KW: cache})
        whole = visor(**{**inputs, "input_ids": torch.cat([inputs["input_ids"], new], 1), "attention_mask": full_mask},
                      budget=budget)
    assert (step.logits - whole.logits[:, -3:]).abs().max() <= 1e-4


def test_cache_holds_text_only_outside_self_attention_layers(visor, batch):
    with torch.no_grad():
        out = visor(**batch, budget=1, use_cache=True)
    cache = out.past_key_values if out.past_key_values is not None else out.cache
    length = batch["input_ids"].shape[1]
    # text-only layers cache the text tokens (padding is in no stream), the longest sample's count
    num_text = int(((batch["input_ids"] != IMAGE_TOKEN_ID) & batch["attention_mask"].bool()).sum(1).max())
    assert out.self_attn_layers == [(4,), (4,)]
    for layer in range(6):
        keys = cache.layers[layer].keys
        assert keys.shape[2] == (length if layer == 4 else num_text), layer
    # Cross-attention keys/values of the visual tokens are computed once and kept.
    assert sorted(cache.prompt.cross_key_values) == [1, 3, 5]
    assert cache.get_seq_length() == length


def test_text_before_the_image_does_not_read_it(visor, llava):
    """Causal order of cross-attention: tokens placed before the image get nothing from it."""
    inputs = tiny_inputs(llava, [(56, 56)], [(5, 3)])
    other = dict(inputs, pixel_values=inputs["pixel_values"] + 1.0)
    with torch.no_grad():
        a = visor(**inputs, budget=0).logits
        b = visor(**other, budget=0).logits
    assert torch.equal(a[0, :5], b[0, :5])
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4  # and tokens after it do read it


def test_loss_uses_labels_like_llava(visor, batch):
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    out = visor(**batch, labels=labels, budget=1)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    assert visor.model.cross_attn["3"].gate.grad is not None
    visor.zero_grad()


def test_a_checkpoints_copy_of_the_code_leaves_the_package_models_attention_alone(visor, batch):
    """A process can hold two copies of modeling_visor: the package's and a checkpoint's (`trust_remote_code`). Each
    registers its attention function with transformers' global registry; the package model must still run its own
    (a mixed-budget decode passes it the package's `GroupedKeyValues`, which another copy's function would not know)."""
    from transformers import AutoModelForImageTextToText

    from visor_hf.demo import DEFAULT_MODEL

    remote = AutoModelForImageTextToText.from_pretrained(DEFAULT_MODEL, trust_remote_code=True)
    assert type(remote).__module__ != type(visor).__module__  # the checkpoint's own copy of the code is loaded
    cached = greedy(visor, batch, [0, "full"], use_cache=True)
    uncached = greedy(visor, batch, [0, "full"], use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
