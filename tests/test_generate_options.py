"""What transformers users try with generate: hidden states, prompt lookup and assisted decoding (with the cache
cropped after rejected candidates), and a clear error for attention weights."""

import pytest
import torch

from visor_hf import VisorForConditionalGeneration
from visor_hf.modeling_visor import CACHE_FIELD, VisorCache
from visor_hf.testing import IMAGE_TOKEN_ID, tiny_inputs

from .conftest import IMAGE_SIZES, PROMPT_LENGTHS


def test_hidden_states_are_llava_onevisions_on_text_positions(llava, batch):
    """At the full budget with every layer in S and zero gates, the text stream entering each layer (and the final
    norm's output) is LLaVA-OneVision's hidden state at the text positions."""
    visor = VisorForConditionalGeneration.from_llava_onevision(llava, cross_attn_layers=[1, 3], self_attn_layers=list(range(6))).eval()
    with torch.no_grad():
        expected = llava(**batch, output_hidden_states=True).hidden_states
        got = visor(**batch, budget="full", output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == 7
    text = (batch["input_ids"] != IMAGE_TOKEN_ID) & batch["attention_mask"].bool()
    for layer, (ours, theirs) in enumerate(zip(got, expected)):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs()[text].max() <= 1e-4, layer


def test_generate_returns_hidden_states_of_every_step(visor, batch):
    out = visor.generate(
        **batch, budget=[0, "full"], max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        output_hidden_states=True,
    )
    assert len(out.hidden_states) == 3  # one entry a step, each with L + 1 tensors
    assert out.hidden_states[0][0].shape[:2] == batch["input_ids"].shape and out.hidden_states[1][-1].shape[1] == 1
    assert all(len(step) == visor.config.num_layers + 1 for step in out.hidden_states)


def test_attention_weights_are_a_clear_error(visor, batch):
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        visor(**batch, output_attentions=True)


@pytest.fixture(scope="module")
def one_sample(llava):
    return tiny_inputs(llava, IMAGE_SIZES[:1], PROMPT_LENGTHS[:1])


def test_prompt_lookup_gives_greedy_tokens(visor, one_sample):
    plain = visor.generate(**one_sample, budget=1, max_new_tokens=10, do_sample=False, pad_token_id=0)
    lookup = visor.generate(**one_sample, budget=1, max_new_tokens=10, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup, plain)


def test_assisted_decoding_gives_greedy_tokens(visor, one_sample):
    plain = visor.generate(**one_sample, budget=1, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assisted = visor.generate(**one_sample, budget=1, max_new_tokens=10, do_sample=False, pad_token_id=0, assistant_model=visor)
    assert torch.equal(assisted, plain)


@pytest.mark.parametrize("budget", [[0, "full"], [1, 1]])
def test_cropped_cache_continues_as_if_the_dropped_tokens_never_came(visor, batch, budget):
    """Decode 3 tokens, crop 2 away, decode 2 others: the logits equal decoding those directly (mixed budgets keep
    per-group caches, which crop too)."""
    def step(cache, token):
        return visor(input_ids=token, use_cache=True, **{CACHE_FIELD: cache}).logits[:, -1]

    with torch.no_grad():
        caches = [VisorCache(), VisorCache()]
        for cache in caches:
            visor(**batch, budget=budget, use_cache=True, **{CACHE_FIELD: cache})
        detour, kept = torch.tensor([[7], [9]]), torch.tensor([[11], [13]])
        step(caches[0], kept)
        step(caches[0], detour)
        step(caches[0], detour)
        caches[0].crop(-2)
        assert caches[0].get_seq_length() == caches[1].get_seq_length() + 1
        step(caches[1], kept)
        for token in (detour + 1, kept + 1):
            torch.testing.assert_close(step(caches[0], token), step(caches[1], token), atol=1e-5, rtol=0)
