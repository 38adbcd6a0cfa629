"""The plugin with a fixed self-attention set S chosen at launch (`hf_overrides={"serve_self_attn_layers": S}`)
against `visor_hf` at `budget=S` on the kept toy checkpoint: greedy tokens equal, log-probabilities close.

S is the toy checkpoint's configuration of two self-attention layers: they run on [V; T] in the dense order, and the
cross-attention after them reads the visual tokens those layers changed."""

from __future__ import annotations

import pytest

from conftest import (CHECKPOINT, assert_same_greedy, chat_prompt, configuration_of_size, make_llm, multi_image_cases,
                      request, toy_image, toy_question, vllm_greedy)

SELF_ATTN_LAYERS = configuration_of_size(2)


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(hf_overrides={"serve_self_attn_layers": list(SELF_ATTN_LAYERS)})
    yield engine
    del engine


def test_single_image_prompt(llm, reference):
    prompt, images = chat_prompt(toy_question(20)), [toy_image(20)]
    assert_same_greedy(vllm_greedy(llm, [request(prompt, images)])[0],
                       reference.greedy(prompt, images, budget=SELF_ATTN_LAYERS))


def test_batch_of_image_sizes_and_text_only(llm, reference):
    """Prompts with different visual-token counts and a text-only one in one batch, decoded together: each gets what
    it gets alone in visor_hf (the decode steps read text and visual keys from their two caches)."""
    cases = [
        (chat_prompt(toy_question(21)), [toy_image(21, (40, 24))]),
        (chat_prompt(toy_question(22), num_images=0), None),
        (chat_prompt(toy_question(23)), [toy_image(23)]),
        (chat_prompt(toy_question(24)), [toy_image(24, (24, 60))]),
    ]
    results = vllm_greedy(llm, [request(prompt, images) for prompt, images in cases])
    for (prompt, images), got in zip(cases, results):
        assert_same_greedy(got, reference.greedy(prompt, images, budget=SELF_ATTN_LAYERS))


def test_multi_image_prompts(llm, reference):
    """Several images in a prompt: the layers of S run on each prompt's dense sequence with all its images."""
    cases = multi_image_cases()
    results = vllm_greedy(llm, [request(prompt, images) for prompt, images in cases])
    for (prompt, images), got in zip(cases, results):
        assert_same_greedy(got, reference.greedy(prompt, images, budget=SELF_ATTN_LAYERS))


def test_kv_cache_specs(llm):
    """A layer of S caches its text keys in a full-attention cache (text tokens only, like every text layer) and its
    visual keys in a cross-attention cache sized by the encoder length."""
    from vllm.v1.kv_cache_interface import CrossAttentionSpec, FullAttentionSpec

    specs = llm.collective_rpc(lambda worker: worker.model_runner.get_kv_cache_spec())[0]
    for layer in SELF_ATTN_LAYERS:
        assert type(specs[f"model.language_model.layers.{layer}.self_attn.attn"]) is FullAttentionSpec
        assert isinstance(specs[f"model.language_model.layers.{layer}.self_attn.visual_attn"], CrossAttentionSpec)
    visual_caches = [name for name, spec in specs.items() if isinstance(spec, CrossAttentionSpec)]
    config = llm.llm_engine.vllm_config.model_config.hf_config
    assert len(visual_caches) == len(config.cross_attn_layers) + len(SELF_ATTN_LAYERS)


def test_served_self_attention_set_is_a_fixed_budget():
    """`serve_self_attn_layers` reads as visor_hf's fixed budgets; an unknown set and "auto" are refused."""
    from visor_vllm.config import VisorServingConfig, served_self_attn_layers

    config = VisorServingConfig.from_pretrained(CHECKPOINT)
    assert served_self_attn_layers(config) == ()
    two, one = configuration_of_size(2), configuration_of_size(1)
    for value, layers in [(list(reversed(two)), two), (1, one), ("full", (1, 3, 5))]:
        config.update({"serve_self_attn_layers": value})  # what vLLM does with hf_overrides
        assert served_self_attn_layers(config) == layers
    not_searched = next([a, b] for a in (1, 3, 5) for b in (1, 3, 5) if a < b and (a, b) != two)
    for value in (not_searched, "auto", 7):  # not a configuration; the router; no configuration has 7 layers
        config.update({"serve_self_attn_layers": value})
        with pytest.raises(ValueError, match="serve_self_attn_layers"):
            served_self_attn_layers(config)
