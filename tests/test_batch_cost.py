"""A batch pays for what each sample runs: at a layer some samples run on [V; T] and others skip, each group runs as
what it is (DESIGN.md, "A sample pays for what it runs"). FLOPs are counted with torch's FlopCounterMode on eager
attention (the CPU SDPA kernel has no FLOP formula)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from visor_hf import VisorForConditionalGeneration
from visor_hf.flops import cache_nbytes
from visor_hf.modeling_visor import CACHE_FIELD
from visor_hf.testing import tiny_inputs, tiny_llava_onevision

from .conftest import perturb_new_parameters
from .test_generation import single

# (image size or None, (text before, text after)) per sample
SAME_LENGTH = [((112, 112), (3, 4))] * 4
PADDED = [((56, 112), (3, 4)), ((112, 112), (2, 7)), (None, (5, 6)), ((112, 56), (4, 2))]


@pytest.fixture(scope="module")
def eager_visor():
    llava = tiny_llava_onevision(attn_implementation="eager")
    model = VisorForConditionalGeneration.from_llava_onevision(llava, cross_attn_layers=[1, 3, 5], self_attn_layers=[1, 3, 5])
    return llava, perturb_new_parameters(model).eval()


def prefill_flops(model, inputs, budget) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, budget=budget)
    return counter.get_total_flops()


@pytest.mark.parametrize("budgets", [[0, 0, 0, "full"], ["full", 1, 0, 2], [1, 1, "full", 0]])
def test_mixed_batch_prefill_costs_the_sum_of_its_samples(eager_visor, budgets):
    """Prompts of one length (no padding): the batch costs what its samples cost alone, not the union of their layers."""
    llava, model = eager_visor
    inputs = tiny_inputs(llava, [size for size, _ in SAME_LENGTH], [lengths for _, lengths in SAME_LENGTH])
    together = prefill_flops(model, inputs, budgets)
    singles = sum(prefill_flops(model, sample_inputs(llava, SAME_LENGTH[i]), budgets[i]) for i in range(len(budgets)))
    assert singles <= together <= 1.05 * singles, (together, singles)
    assert together < prefill_flops(model, inputs, "full")


@pytest.mark.parametrize("budgets", [[0, 0, "full"], ["full", 1, 0], [1, "full", 2]])
def test_padded_mixed_batch_costs_each_sample_at_its_own_budget(eager_visor, budgets):
    """With padding every sample of a batch is padded to the same shapes, so a sample's share of a batch that runs
    one budget for all is what it costs there; a mixed batch must cost the sum of those shares (within 5 %), where
    running the union of the samples' layers would cost the "full" batch."""
    llava, model = eager_visor
    samples = [sample for sample in PADDED if sample[0] is not None]
    inputs = tiny_inputs(llava, [size for size, _ in samples], [lengths for _, lengths in samples])
    shares = sum(prefill_flops(model, inputs, budget) for budget in budgets) / len(budgets)
    together = prefill_flops(model, inputs, budgets)
    assert abs(together - shares) <= 0.05 * shares, (together, shares)
    assert together < prefill_flops(model, inputs, "full")


def sample_inputs(llava, sample):
    size, lengths = sample
    return tiny_inputs(llava, [size], [lengths])


@pytest.mark.parametrize("budgets", [["full", 1, 0], [0, "full", 0], [2, 2, "full"]])
def test_mixed_batch_gives_each_sample_its_own_logits(eager_visor, budgets):
    llava, model = eager_visor
    samples = [sample for sample in PADDED if sample[0] is not None]
    inputs = tiny_inputs(llava, [size for size, _ in samples], [lengths for _, lengths in samples])
    with torch.no_grad():
        together = model(**inputs, budget=budgets).logits[:, -1]
        for i, budget in enumerate(budgets):
            expected = model(**single(inputs, i), budget=budget).logits[0, -1]
            torch.testing.assert_close(together[i], expected, atol=1e-5, rtol=0)


def prefill_and_decode(model, inputs, budget) -> tuple[int, int]:
    """(bytes of keys/values the cache holds after the prefill, FLOPs of the next decoding step)."""
    with torch.no_grad():
        out = model(**inputs, budget=budget, use_cache=True)
        cache = out[CACHE_FIELD]
        nbytes = cache_nbytes(cache)["total"]
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        with FlopCounterMode(display=False) as counter:
            model(input_ids=token, attention_mask=mask, **{CACHE_FIELD: cache}, use_cache=True)
    return nbytes, counter.get_total_flops()


@pytest.mark.parametrize("budgets", [[0, 0, 0, "full"], ["full", 1, 0, 2]])
def test_mixed_batch_caches_and_decodes_what_its_samples_do(eager_visor, budgets):
    """The KV cache of a mixed batch holds what its samples' caches hold alone (a sample that skips a layer caches
    its text only there), and a decoding step costs the sum of theirs (within 5 %)."""
    llava, model = eager_visor
    inputs = tiny_inputs(llava, [size for size, _ in SAME_LENGTH], [lengths for _, lengths in SAME_LENGTH])
    together = prefill_and_decode(model, inputs, budgets)
    singles = [prefill_and_decode(model, sample_inputs(llava, SAME_LENGTH[i]), b) for i, b in enumerate(budgets)]
    assert together[0] == sum(nbytes for nbytes, _ in singles)
    decode_singles = sum(flops for _, flops in singles)
    assert decode_singles <= together[1] <= 1.05 * decode_singles, (together[1], decode_singles)
    assert together[0] < prefill_and_decode(model, inputs, "full")[0]
