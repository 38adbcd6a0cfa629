"""budget="auto": the router picks a configuration per sample from its routing tokens."""

import pytest
import torch

from visor_hf.testing import tiny_inputs

from .conftest import IMAGE_SIZES, PROMPT_LENGTHS

ROUTING_TOKEN_ID = 251


def with_routing_tokens(inputs, slots=(-1,)):
    """Put a routing token at the given positions of every sample (the last one ends the question)."""
    ids = inputs["input_ids"].clone()
    for slot in slots:
        ids[:, slot] = ROUTING_TOKEN_ID
    return dict(inputs, input_ids=ids)


class ForcedRouter(torch.nn.Module):
    """Scores configuration `choices[t]` highest at the t-th routing token of a single sample."""

    def __init__(self, input_ids, choices, num_configurations=3):
        super().__init__()
        self.is_routing = input_ids[0] == ROUTING_TOKEN_ID
        self.choices, self.num_configurations = choices, num_configurations

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:2], self.num_configurations)
        slots = torch.nonzero(self.is_routing[-hidden.shape[1] :]).flatten()  # no padding, no image: slot = token
        for slot, choice in zip(slots, self.choices):
            logits[0, slot, choice] = 10.0
        return logits


@pytest.mark.parametrize("choices, expected", [((0, 2), (1, 4)), ((2, 0), (1, 4)), ((1, 0), (4,)), ((0, 0), ())])
def test_several_questions_take_the_most_expensive_configuration(routed_visor, llava, choices, expected):
    inputs = with_routing_tokens(tiny_inputs(llava, [None], [(6, 6)]), slots=(2, -1))
    router = routed_visor.model.router
    routed_visor.model.router = ForcedRouter(inputs["input_ids"], choices)
    try:
        assert routed_visor.route(**inputs) == [expected]
        with torch.no_grad():
            out = routed_visor(**inputs, budget="auto")
    finally:
        routed_visor.model.router = router
    assert out.self_attn_layers == [expected]


def random_router_that_disagrees(model, inputs):
    """Seeded router weights under which the two samples of `inputs` pick different configurations."""
    for seed in range(50):
        torch.manual_seed(seed)
        for param in model.model.router.parameters():
            torch.nn.init.normal_(param, std=2.0)
        picks = model.route(**inputs)
        if picks[0] != picks[1]:
            return picks
    raise AssertionError("no seed gave two different configurations")


def test_auto_runs_the_routed_layers_and_batch_equals_single(routed_visor, batch):
    inputs = with_routing_tokens(batch)
    picks = random_router_that_disagrees(routed_visor, inputs)
    assert all(tuple(p) in map(tuple, routed_visor.config.configurations) for p in picks)
    with torch.no_grad():
        auto = routed_visor(**inputs, budget="auto")
        fixed = routed_visor(**inputs, budget=list(picks))
    assert auto.self_attn_layers == picks
    assert torch.equal(auto.logits, fixed.logits)
    generated = routed_visor.generate(**inputs, budget="auto", max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i in range(2):
        keep = inputs["attention_mask"][i].bool()
        alone = {
            "input_ids": inputs["input_ids"][i : i + 1, keep], "attention_mask": inputs["attention_mask"][i : i + 1, keep],
            "pixel_values": inputs["pixel_values"][i : i + 1], "image_sizes": inputs["image_sizes"][i : i + 1],
        }
        with torch.no_grad():
            single = routed_visor(**alone, budget="auto")
        assert single.self_attn_layers == [picks[i]]
        assert (single.logits[0, -1] - auto.logits[i, -1]).abs().max() <= 1e-4
        expected = routed_visor.generate(**alone, budget="auto", max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(generated[i, inputs["input_ids"].shape[1] :], expected[0, alone["input_ids"].shape[1] :])


def test_auto_mixes_with_fixed_budgets_in_one_batch(routed_visor, batch):
    inputs = with_routing_tokens(batch)
    picks = routed_visor.route(**inputs)
    with torch.no_grad():
        out = routed_visor(**inputs, budget=["auto", 0])
    assert out.self_attn_layers == [picks[0], ()]


def test_sample_without_routing_token_falls_back_to_the_default_budget(routed_visor, batch):
    with torch.no_grad():
        out = routed_visor(**batch, budget="auto")
    assert out.self_attn_layers == [(1, 4), (1, 4)]  # default_budget "full"
