"""The plugin in bfloat16 (vLLM's default dtype on the CPU), with a fixed S: the answer token equals visor_hf's
float32 answer (the toy model answers with one token, then EOS), and the vision tower runs in the served dtype."""

from __future__ import annotations

import pytest

from conftest import chat_prompt, configuration_of_size, make_llm, request, toy_image, toy_question


@pytest.fixture(scope="module")
def llm():
    engine = make_llm(dtype="bfloat16", hf_overrides={"serve_self_attn_layers": list(configuration_of_size(1))})
    yield engine
    del engine


def test_answers_equal_float32_reference(llm, reference):
    from vllm import SamplingParams

    cases = [(chat_prompt(toy_question(seed)), [toy_image(seed)]) for seed in (30, 31, 32)]
    outputs = llm.generate([request(p, i) for p, i in cases], SamplingParams(temperature=0, max_tokens=1),
                           use_tqdm=False)
    for (prompt, images), output in zip(cases, outputs):
        assert output.outputs[0].token_ids[0] == reference.greedy(prompt, images, budget=configuration_of_size(1))[0][0]
