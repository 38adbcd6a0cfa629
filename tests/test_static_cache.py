"""A static VISOR cache: `generate(cache_implementation="static")` gives what the dynamic cache gives, and a decoding
step with it has fixed shapes and no host sync, so `torch.compile(fullgraph=True)` compiles it once, whole."""

import pytest
import torch
from torch._dynamo.utils import counters

from visor_hf.modeling_visor import CACHE_FIELD, VisorCache

from .test_generation import greedy
from .test_router import with_routing_tokens


@pytest.mark.parametrize("budget", [0, 1, "full", "auto", [0, "full"], ["auto", 1]])
def test_static_cache_generates_what_the_dynamic_cache_generates(routed_visor, batch, budget):
    inputs = with_routing_tokens(batch)
    dynamic = greedy(routed_visor, inputs, budget, use_cache=True, new_tokens=8)
    static = greedy(routed_visor, inputs, budget, use_cache=True, new_tokens=8, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for step_static, step_dynamic in zip(static.scores, dynamic.scores):
        finite = step_dynamic.isfinite()
        assert (step_static - step_dynamic)[finite].abs().max() <= 1e-5


def decode(model, inputs, budget, cache, steps: int, compile_step: bool):
    """Prefill into `cache`, then `steps` greedy decoding steps; returns the tokens and their logits."""
    with torch.no_grad():
        out = model(**inputs, budget=budget, use_cache=True, **{CACHE_FIELD: cache})
        token = out.logits[:, -1:].argmax(-1)

        def step(token):
            return model(input_ids=token, attention_mask=torch.ones_like(token), use_cache=True, **{CACHE_FIELD: cache}).logits

        step = torch.compile(step, fullgraph=True) if compile_step else step
        tokens, logits = [], []
        for _ in range(steps):
            step_logits = step(token)
            token = step_logits[:, -1:].argmax(-1)
            tokens.append(token)
            logits.append(step_logits)
    return torch.cat(tokens, 1), torch.cat(logits, 1)


def test_static_decode_step_compiles_whole_once(visor, batch):
    """fullgraph=True (a graph break is an error), error_on_recompile over 16 steps of a mixed-budget, padded batch:
    one graph, no break, and the tokens of eager decoding with the dynamic cache."""
    steps, budget = 16, [0, "full"]
    expected_tokens, expected_logits = decode(visor, batch, budget, VisorCache(), steps, compile_step=False)
    torch._dynamo.reset()
    counters.clear()
    static = VisorCache(max_cache_len=batch["input_ids"].shape[1] + steps + 1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens, logits = decode(visor, batch, budget, static, steps, compile_step=True)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
