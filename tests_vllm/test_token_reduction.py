"""Token reduction at launch (`hf_overrides={"token_reduction": ...}`): the encoder sequence, and with it every
visual-token cache, holds only the tokens `visor_hf` keeps, which keep their dense RoPE positions. Greedy parity with
`visor_hf`'s `token_reduction=` on the toy checkpoint, with VisionZip (scores from the toy tower's one layer) and a
fixed S, for single-image, multi-image and text-only prompts in one batch."""

from __future__ import annotations

import pytest

from conftest import (assert_same_greedy, chat_prompt, configuration_of_size, make_llm, multi_image_cases, request,
                      toy_image, toy_question, vllm_greedy)

SELF_ATTN_LAYERS = configuration_of_size(2)
REDUCTION = {"method": "visionzip", "keep_ratio": 0.5, "score_layer": 0}


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(hf_overrides={"serve_self_attn_layers": list(SELF_ATTN_LAYERS), "token_reduction": REDUCTION})
    yield engine
    del engine


def test_encoder_length_is_the_kept_tokens(llm, reference):
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from visor_hf.flops import token_reduction_counts

    processor = MULTIMODAL_REGISTRY.create_processor(llm.llm_engine.vllm_config.model_config)
    for size in [(64, 64), (40, 24)]:
        out = processor(chat_prompt("what?"), processor.info.parse_mm_data({"image": toy_image(50, size)}))
        counts = token_reduction_counts(reference.model.config, (size[1], size[0]), REDUCTION)
        assert len(out["encoder_prompt_token_ids"]) == counts["kept"] < counts["num_vision_tokens"]


def test_greedy_parity(llm, reference):
    cases = [
        (chat_prompt(toy_question(60)), [toy_image(60)]),
        (chat_prompt(toy_question(61)), [toy_image(61, (40, 24))]),
        (chat_prompt(toy_question(62), num_images=0), None),
        *multi_image_cases()[1:3],
    ]
    results = vllm_greedy(llm, [request(prompt, images) for prompt, images in cases])
    for (prompt, images), got in zip(cases, results):
        want = reference.greedy(prompt, images, budget=SELF_ATTN_LAYERS, token_reduction=REDUCTION)
        assert_same_greedy(got, want)


def test_out_of_range_scoring_layer_is_refused():
    with pytest.raises(Exception, match="score_layer"):
        make_llm(hf_overrides={"token_reduction": {**REDUCTION, "score_layer": -2}})  # the toy tower has one layer
