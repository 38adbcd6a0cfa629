"""A prefill compiled with dynamic shapes (`torch.compile(dynamic=True)`): it gives the eager prefill's logits, breaks the
graph only where the host must decide (how many placeholders, the two streams' sizes, the router's choice) or where
transformers' LLaVA-OneVision breaks it too, and compiles once for every prompt length."""

import torch

from visor_hf.testing import tiny_inputs

from .test_router import with_routing_tokens

# The prefill's host decisions: everything else runs in the graph.
HOST_DECISIONS = {"check_prompt_inputs", "split_prompt", "route_samples"}
# Sample budgets that make every kind of layer step: text only, every sample on [V; T], a split batch; and the router.
BUDGET = [0, "full", "auto"]
IMAGE_SIZES = [(32, 32), (32, 48), (48, 32)]


def prompts(llava, before: int, after: int) -> dict:
    """Three padded samples of different image sizes, `before` + image + `after` tokens long (less for the others)."""
    lengths = [(before, after), (before - 2, after - 3), (before - 1, after - 5)]
    return with_routing_tokens(tiny_inputs(llava, IMAGE_SIZES, lengths))


def break_sites(model, inputs, **kwargs) -> set[tuple[str, str]]:
    """(file, function) of the innermost frame of each graph break of `model(**inputs)` under torch.compile."""
    torch._dynamo.reset()
    with torch.no_grad():
        model(**inputs, **kwargs)  # eager first: one-time work (transformers installs its output hooks) is done
        explained = torch._dynamo.explain(lambda: model(**inputs, **kwargs).logits)()
    return {(b.user_stack[-1].filename, b.user_stack[-1].name) for b in explained.break_reasons if b.user_stack}


def test_compiled_prefill_breaks_only_at_host_decisions(llava, routed_visor):
    inputs = prompts(llava, 6, 14)
    sites = break_sites(routed_visor, inputs, budget=BUDGET)
    ours = {name for path, name in sites if "visor_hf" in path}
    assert ours <= HOST_DECISIONS, f"graph breaks in VISOR's code outside the host decisions: {ours - HOST_DECISIONS}"
    assert {"check_prompt_inputs", "split_prompt"} <= ours  # the test sees the breaks it means to see
    # the others are transformers' (its anyres code, its output hooks): LLaVA-OneVision breaks there too
    dense_sites = break_sites(llava, {k: v for k, v in inputs.items()})
    theirs = {site for site in sites if "visor_hf" not in site[0]}
    assert theirs <= dense_sites, f"graph breaks outside VISOR's code that dense LLaVA-OV does not have: {theirs - dense_sites}"


def test_compiled_prefill_compiles_once_for_every_prompt_length(llava, routed_visor):
    """The first call compiles; prompts of two other lengths run without a recompilation and give eager's logits."""

    def prefill(inputs):
        with torch.no_grad():
            return routed_visor(**inputs, budget=BUDGET).logits

    compiled = torch.compile(prefill, dynamic=True)
    torch._dynamo.reset()
    # prompt lengths (63, 66, 77) equal to no other size: no duck-sizing guard ties them to one
    for call, (before, after) in enumerate([(7, 20), (9, 21), (11, 30)]):
        inputs = prompts(llava, before, after)
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            logits = compiled(inputs)
        torch.testing.assert_close(logits, prefill(inputs), atol=1e-5, rtol=0)
