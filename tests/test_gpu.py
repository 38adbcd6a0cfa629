"""On a CUDA GPU: VISOR against transformers' dense LLaVA-OneVision in float32 and bfloat16, cached vs uncached.

These tests need a GPU and are skipped without one (they are not part of the CPU count; BENCHMARKS.md records when
they last ran on a GPU). Run them with `pytest tests/test_gpu.py` on a CUDA machine.

bfloat16 results cannot be bit-equal to float32 ones, so each bfloat16 check measures the error of transformers'
own dense model in bfloat16 against its float32 run, and asks VISOR's error to be of the same size.
"""

import os
import warnings

import pytest
import torch

from visor_hf import VisorForConditionalGeneration
from visor_hf.modeling_visor import CACHE_FIELD as CACHE_KW
from visor_hf.testing import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava_onevision

from .conftest import IMAGE_SIZES, PROMPT_LENGTHS, perturb_new_parameters

# VISOR_TEST_DEVICE=cpu dry-runs these checks on the CPU (bfloat16 included), e.g. after editing them.
CUDA = os.environ.get("VISOR_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(CUDA == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Wider than the CPU tests' model, so that bfloat16 rounding is like a real model's (hidden 256, 8 heads, 2 KV heads).
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 on the GPU without TF32 (cuDNN allows it for convolutions by default), so float32 checks are tight."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on(inputs, dtype=None):
    return {k: (v.to(CUDA, dtype) if v.is_floating_point() and dtype else v.to(CUDA)) for k, v in inputs.items()}


def text_positions(inputs):
    return ((inputs["input_ids"] != IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()).to(CUDA)


def models(attn_implementation="sdpa", self_attn_layers=tuple(range(6)), perturb=False, **overrides):
    """Dense LLaVA-OV and VISOR grafted on it (float32, on the device), and a padded two-image batch (on the CPU)."""
    llava = tiny_llava_onevision(attn_implementation=attn_implementation, **overrides)
    inputs = tiny_inputs(llava, IMAGE_SIZES, PROMPT_LENGTHS)
    visor = VisorForConditionalGeneration.from_llava_onevision(
        llava, cross_attn_layers=[1, 3, 5], self_attn_layers=list(self_attn_layers)
    ).eval()
    if perturb:
        perturb_new_parameters(visor)
    return llava.to(CUDA), visor.to(CUDA), inputs


def logits(model, inputs, dtype, **kwargs):
    with torch.no_grad():
        return model.to(dtype)(**on(inputs, dtype), **kwargs).logits.float()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_full_budget_matches_llava_onevision_in_float32_on_gpu(attn_implementation):
    llava, visor, inputs = models(attn_implementation)
    expected = logits(llava, inputs, torch.float32)
    got = logits(visor, inputs, torch.float32, budget="full")
    assert (got - expected).abs()[text_positions(inputs)].max() <= 1e-4


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_full_budget_bfloat16_error_is_dense_bfloat16_error(attn_implementation):
    llava, visor, inputs = models(attn_implementation, **WIDE)
    mask = text_positions(inputs)
    reference = logits(llava, inputs, torch.float32)[mask]
    dense_error = (logits(llava, inputs, torch.bfloat16)[mask] - reference).abs().max()
    visor_error = (logits(visor, inputs, torch.bfloat16, budget="full")[mask] - reference).abs().max()
    assert 0 < dense_error < 0.2 * reference.abs().max()  # the comparison measures bfloat16 rounding, not noise
    assert 0 < visor_error <= 1.5 * dense_error + 1e-3  # > 0: VISOR really ran in bfloat16


@pytest.mark.parametrize("budget", [0, 1, [0, "full"]])
def test_reduced_budget_on_the_gpu_equals_the_cpu_in_float32(budget):
    """Lower budgets have no dense reference: the same model on the CPU is theirs (float32, no TF32)."""
    _, visor, inputs = models(self_attn_layers=(1, 4), perturb=True)
    mask = text_positions(inputs)
    on_gpu = logits(visor, inputs, torch.float32, budget=budget)
    with torch.no_grad():
        on_cpu = visor.cpu()(**inputs, budget=budget).logits
    assert (on_gpu - on_cpu.to(on_gpu.device)).abs()[mask].max() <= 1e-4


@pytest.mark.parametrize("budget", [0, 1, [0, "full"]])
def test_reduced_budget_in_bfloat16_follows_float32(budget):
    """Cross-attention, CPE and gates in bfloat16: VISOR's bfloat16 error at a low budget is of dense's size."""
    llava, visor, inputs = models(self_attn_layers=(1, 4), perturb=True, **WIDE)
    mask = text_positions(inputs)
    dense_reference = logits(llava, inputs, torch.float32)[mask]
    dense_error = (logits(llava, inputs, torch.bfloat16)[mask] - dense_reference).abs().max()
    reference = logits(visor, inputs, torch.float32, budget=budget)[mask]
    error = (logits(visor, inputs, torch.bfloat16, budget=budget)[mask] - reference).abs().max()
    assert 0 < error <= 2 * dense_error + 1e-3


def teacher_forced_error(model, inputs, new_tokens=6, **kwargs):
    """Greedy generation with the KV cache, then one uncached forward over the generated sequence: largest gap
    between the cached scores and the uncached logits at the generated positions."""
    with torch.no_grad():
        out = model.generate(
            **inputs, use_cache=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            suppress_tokens=[IMAGE_TOKEN_ID], **kwargs,  # a generated image token would break the uncached forward
        )
        full_mask = torch.cat([inputs["attention_mask"], torch.ones_like(out.sequences[:, inputs["input_ids"].shape[1]:])], 1)
        again = model(**{**inputs, "input_ids": out.sequences, "attention_mask": full_mask}, **kwargs).logits
    prompt = inputs["input_ids"].shape[1]
    cached = torch.stack(out.logits, 1).float()
    uncached = again[:, prompt - 1 : prompt - 1 + new_tokens].float()
    return (cached - uncached).abs().max(), out.sequences


@pytest.mark.parametrize("budget", [0, 1, "full"])
def test_cached_generation_equals_uncached_in_float32_on_gpu(budget):
    _, visor, inputs = models(self_attn_layers=(1, 4), perturb=True)
    error, _ = teacher_forced_error(visor, on(inputs), budget=budget)
    assert error <= 1e-4


@pytest.mark.parametrize("budget", [0, 1, "full"])
def test_cached_generation_in_bfloat16_drifts_no_more_than_dense(budget):
    llava, visor, inputs = models(self_attn_layers=(1, 4), perturb=True, **WIDE)
    bf16_inputs = on(inputs, torch.bfloat16)
    dense_error, _ = teacher_forced_error(llava.to(torch.bfloat16), bf16_inputs)
    error, _ = teacher_forced_error(visor.to(torch.bfloat16), bf16_inputs, budget=budget)
    assert error <= 2 * dense_error + 5e-3


def test_batch_generates_what_each_sample_generates_alone_on_gpu():
    _, visor, batch = models(self_attn_layers=(1, 4), perturb=True)
    _, together = teacher_forced_error(visor, on(batch), budget=1)
    prompt = batch["input_ids"].shape[1]
    for i in range(2):
        keep = batch["attention_mask"][i].bool()
        alone = {"input_ids": batch["input_ids"][i : i + 1, keep], "attention_mask": batch["attention_mask"][i : i + 1, keep],
                 "pixel_values": batch["pixel_values"][i : i + 1], "image_sizes": batch["image_sizes"][i : i + 1]}
        _, expected = teacher_forced_error(visor, on(alone), budget=1)
        assert torch.equal(together[i, prompt:], expected[0, int(keep.sum()):])


def test_flash_attention_2_checkpoint_has_dense_flash_attention_2_error():
    """A model loaded with attn_implementation="flash_attention_2": SigLIP runs flash attention, VISOR's language
    layers run SDPA (their masks are not plain causal); its bfloat16 error is that of dense with flash attention."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (pip install visor_hf[flash])")
    llava, visor, _ = models("flash_attention_2", **WIDE)
    inputs = tiny_inputs(llava.cpu(), [(112, 112)], [(4, 6)])  # one unpadded sample: flash attention's plain case
    llava.to(CUDA)
    mask = text_positions(inputs)
    reference = logits(llava, inputs, torch.float32)[mask]  # flash attention runs in half precision only
    dense_error = (logits(llava, inputs, torch.bfloat16)[mask] - reference).abs().max()
    visor_error = (logits(visor, inputs, torch.bfloat16, budget="full")[mask] - reference).abs().max()
    assert visor_error <= 1.5 * dense_error + 1e-3


def host_syncs(fn) -> int:
    """How many times `fn()` makes the host wait for the GPU (torch's sync debug mode warns at each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


@pytest.mark.skipif(CUDA != "cuda", reason="sync debug mode is CUDA's")
def test_host_syncs_do_not_grow_with_depth():
    """Which layers run is decided on the host: a prefill and a decode step wait for the GPU as often with 12 layers
    as with 6 (a sync per layer would leave the GPU idle while Python launches the next layer)."""
    probe = torch.zeros(1, device=CUDA)
    counted = host_syncs(lambda: [probe.item() for _ in range(3)]) - host_syncs(lambda: None)
    assert counted == 3, "sync warnings are deduplicated: cannot count"
    counts = []
    for num_layers in (6, 12):
        llava = tiny_llava_onevision(num_layers=num_layers)
        inputs = on(tiny_inputs(llava, IMAGE_SIZES, PROMPT_LENGTHS))
        visor = VisorForConditionalGeneration.from_llava_onevision(llava).eval().to(CUDA)
        with torch.no_grad():
            visor(**inputs, budget="full", use_cache=True)  # warm-up
            prefill = host_syncs(lambda: visor(**inputs, budget="full", use_cache=True))
            out = visor(**inputs, budget="full", use_cache=True)
            cache = out.past_key_values if out.past_key_values is not None else out.cache
            token = out.logits[:, -1:].argmax(-1)
            step = host_syncs(lambda: visor(input_ids=token, use_cache=True, **{CACHE_KW: cache}))
        counts.append((prefill, step))
    assert counts[0] == counts[1], f"host syncs (prefill, decode step) at 6 and 12 layers: {counts}"
