"""VISOR-TR token packing (`token_reduction={"method": "pack", "pack_factor": 2}`), which needs a trained packing
layer: a copy of the toy checkpoint with one (initialised to the mean of each pair, as `visor_hf` initialises it)
loads in both `visor_hf` and the plugin, and their greedy outputs agree at budget 0."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (CHECKPOINT, VisorReference, assert_same_greedy, chat_prompt, make_llm, request, toy_image,
                      toy_question, vllm_greedy)

PACKING = {"method": "pack", "pack_factor": 2}


@pytest.fixture(scope="module")
def packed_checkpoint(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("packed") / "checkpoint")
    shutil.copytree(CHECKPOINT, folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["token_reduction"] = PACKING
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    hidden = config["text_config"]["hidden_size"]
    weights["model.token_packer.weight"] = torch.eye(hidden).repeat(1, 2) / 2
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def llm(packed_checkpoint):
    engine = make_llm(model=packed_checkpoint)
    yield engine
    del engine


def test_greedy_parity(llm, packed_checkpoint):
    reference = VisorReference(packed_checkpoint)
    cases = [(chat_prompt(toy_question(70)), [toy_image(70)]), (chat_prompt(toy_question(71)), [toy_image(71, (40, 24))])]
    results = vllm_greedy(llm, [request(prompt, images) for prompt, images in cases])
    for (prompt, images), got in zip(cases, results):
        assert_same_greedy(got, reference.greedy(prompt, images))
