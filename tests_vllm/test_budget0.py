"""The plugin at budget 0 (no self-attention layer over visual tokens) against `visor_hf` on the kept toy checkpoint.

Greedy tokens must be equal and each chosen token's log-probability close (`conftest.assert_same_greedy`). One
engine serves the whole module (start-up is the slow part)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import (CHECKPOINT, assert_same_greedy, chat_prompt, make_llm, multi_image_cases, request, toy_image,
                      toy_question, vllm_greedy)


@pytest.fixture(scope="module")
def llm():
    engine = make_llm()
    yield engine
    del engine


def test_plugin_is_registered():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    load_general_plugins()  # what every vLLM process does first
    assert "visor" in {e.name for e in entry_points(group="vllm.general_plugins")}
    assert "VisorForConditionalGeneration" in ModelRegistry.get_supported_archs()
    assert _CONFIG_REGISTRY["visor"].__name__ == "VisorServingConfig"


@pytest.mark.parametrize("size", [(64, 64), (40, 24), (24, 60), (32, 32)])
def test_prompt_splits_into_text_and_visual_tokens(llm, reference, size):
    """Decoder prompt = the text tokens; encoder prompt = one token per visual token, as many as visor_hf's processor
    expands the image into; the image's text offset is the number of text tokens before it."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    processor = MULTIMODAL_REGISTRY.create_processor(llm.llm_engine.vllm_config.model_config)
    prompt = chat_prompt("what colour is the large shape?")
    image = toy_image(5, size)
    out = processor(prompt, processor.info.parse_mm_data({"image": image}))
    image_token = reference.model.config.image_token_index
    expanded = reference.processor(images=image, text=prompt)["input_ids"][0]
    assert out["prompt_token_ids"] == [t for t in expanded if t != image_token]
    assert out["encoder_prompt_token_ids"] == [t for t in expanded if t == image_token]
    text_offset = int(out["mm_kwargs"]["image"][0]["text_offset"].data)
    assert text_offset == expanded.index(image_token)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_image_prompt(llm, reference, seed):
    prompt, images = chat_prompt(toy_question(seed)), [toy_image(seed)]
    assert_same_greedy(vllm_greedy(llm, [request(prompt, images)])[0], reference.greedy(prompt, images))


def test_text_only_prompt(llm, reference):
    """No image: the cross-attention reads nothing (zero output, never NaN)."""
    prompt = chat_prompt("what colour is the large shape?", num_images=0)
    assert_same_greedy(vllm_greedy(llm, [request(prompt)])[0], reference.greedy(prompt))


def test_batch_of_image_sizes(llm, reference):
    """One batch: images of different sizes (different visual-token counts) and a text-only prompt; each request
    gets what it gets alone in visor_hf."""
    cases = [
        (chat_prompt(toy_question(10)), [toy_image(10)]),
        (chat_prompt(toy_question(11)), [toy_image(11, (40, 24))]),
        (chat_prompt(toy_question(12), num_images=0), None),
        (chat_prompt(toy_question(13)), [toy_image(13, (24, 60))]),
        (chat_prompt(toy_question(14)), [toy_image(14, (32, 32))]),
    ]
    results = vllm_greedy(llm, [request(prompt, images) for prompt, images in cases])
    for (prompt, images), got in zip(cases, results):
        assert_same_greedy(got, reference.greedy(prompt, images))


def test_multi_image_prompts(llm, reference):
    """Several images in one prompt (LLaVA-OneVision's multi-image treatment), batched with a single-image prompt:
    image-causal cross-attention, each image its own CPE sequence."""
    cases = multi_image_cases() + [(chat_prompt(toy_question(12)), [toy_image(12)])]
    results = vllm_greedy(llm, [request(prompt, images) for prompt, images in cases])
    for (prompt, images), got in zip(cases, results):
        assert_same_greedy(got, reference.greedy(prompt, images))


def test_multi_image_prompt_split(llm, reference):
    """All images of a prompt are one encoder input: their visual tokens, image after image, and each image's text
    offset."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    processor = MULTIMODAL_REGISTRY.create_processor(llm.llm_engine.vllm_config.model_config)
    prompt, images = multi_image_cases()[2]
    out = processor(prompt, processor.info.parse_mm_data({"image": images}))
    image_token = reference.model.config.image_token_index
    expanded = reference.processor(images=[images], text=prompt)["input_ids"][0]
    assert out["prompt_token_ids"] == [t for t in expanded if t != image_token]
    assert out["encoder_prompt_token_ids"] == [t for t in expanded if t == image_token]
    item = out["mm_kwargs"]["image"][0]
    assert item["num_visual_tokens"].data.tolist() == [17, 17]  # base crop (4 x 4) + newline each
    # this prompt has text between its images: each image starts a run of image tokens
    starts = [i for i, t in enumerate(expanded) if t == image_token and expanded[i - 1] != image_token]
    assert item["text_offset"].data.tolist() == [start - 17 * k for k, start in enumerate(starts)]


@pytest.mark.parametrize("num_placeholders, num_images", [(1, 0), (0, 1), (1, 2)])
def test_placeholders_must_match_images(llm, num_placeholders, num_images):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    processor = MULTIMODAL_REGISTRY.create_processor(llm.llm_engine.vllm_config.model_config)
    data = processor.info.parse_mm_data({"image": [toy_image(k) for k in range(num_images)]} if num_images else {})
    with pytest.raises(ValueError, match="placeholders"):
        processor(chat_prompt("what?", num_images=num_placeholders), data)


def test_kv_cache_specs(llm):
    """Text layers: full attention over the decoder's (text) tokens; cross-attention layers: a cross-attention spec,
    sized per request by the encoder length. No layer caches visual tokens as decoder tokens."""
    from vllm.v1.kv_cache_interface import CrossAttentionSpec, FullAttentionSpec

    specs = llm.collective_rpc(lambda worker: worker.model_runner.get_kv_cache_spec())[0]
    config = llm.llm_engine.vllm_config.model_config.hf_config
    text_layers = {f"model.language_model.layers.{i}.self_attn.attn" for i in range(config.num_layers)}
    cross_layers = {f"model.cross_attn.{i}.attn" for i in config.cross_attn_layers}
    assert set(specs) == text_layers | cross_layers
    for name in text_layers:
        assert type(specs[name]) is FullAttentionSpec, name
    for name in cross_layers:
        assert isinstance(specs[name], CrossAttentionSpec), name
    groups = llm.collective_rpc(lambda worker: [
        (type(group.kv_cache_spec).__name__, list(group.layer_names))
        for group in worker.model_runner.kv_cache_config.kv_cache_groups
    ])[0]
    assert {name for kind, names in groups if kind == "CrossAttentionSpec" for name in names} == cross_layers


def test_weights_equal_checkpoint(llm):
    """Every checkpoint tensor (but the router's) has its parameter in the served model, and every parameter comes
    from the checkpoint; unfused ones hold the checkpoint's values. (vLLM's CPU backend repacks the linear layers'
    weights after loading and empties the parameters, so those are checked by the greedy-parity tests.)"""
    from visor_vllm.model import parameter_name

    state = load_file(f"{CHECKPOINT}/model.safetensors")
    served = llm.collective_rpc(
        lambda worker: {name: p.detach().clone() for name, p in worker.model_runner.model.named_parameters()}
    )[0]
    targets, compared = set(), 0
    for name, tensor in state.items():
        if name.startswith("model.router."):
            continue
        served_name, shard = parameter_name(name, served)
        assert served_name in served, name
        targets.add(served_name)
        if shard is None and served[served_name].numel():
            rows = served[served_name][: tensor.shape[0]]  # vLLM pads the vocabulary to a multiple of 64
            assert torch.equal(rows, tensor), name
            compared += 1
    assert targets == set(served) - {"lm_head.weight"}  # the head is tied to the embeddings
    assert compared >= 20
