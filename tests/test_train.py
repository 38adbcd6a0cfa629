"""The training pipeline on a tiny converted model and a small generated data set (CPU)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

from visor_hf import VisorForConditionalGeneration
from visor_hf.convert_llava_ov import convert
from visor_hf.testing import save_llava_onevision, tiny_llava_onevision
from visor_hf.train import main as train_main
from visor_hf.training.data import VisorDataCollator, load_records, to_messages

COMMON = ["--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_llava_onevision(tiny_llava_onevision(), root / "llava")
    convert(root / "llava", root / "visor", cross_attn_layers=[1, 3, 5], self_attn_layers=[1, 4], progress=False)
    images = root / "images"
    images.mkdir()
    records = []
    for i in range(12):
        colour = (40 * i % 255, 90, 200 - 10 * i)
        Image.new("RGB", (48 + 8 * (i % 3), 40), colour).save(images / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": f"c{i % 4}"}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "more?"}, {"from": "gpt", "value": "no"}]
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": turns})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "hi?"}, {"from": "gpt", "value": "ok"}]})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def args(workspace, model, *extra):
    return ["--model", str(model), "--data", str(workspace / "data.jsonl"), "--image_folder", str(workspace / "images"), *extra]


def load(path):
    return VisorForConditionalGeneration.from_pretrained(path)


def test_collator_labels_only_the_answers(workspace):
    from visor_hf.processing_visor import VisorProcessor

    processor = VisorProcessor.from_pretrained(workspace / "visor")
    records = load_records(str(workspace / "data.jsonl"), str(workspace / "images"))
    collator = VisorDataCollator(processor, str(workspace / "images"))
    batch = collator([records[0], records[1], records[12]])  # two turns, one turn, text only
    tokenizer = processor.tokenizer
    for b, answers in enumerate([["c0", "no"], ["c1"], ["ok"]]):
        for q, answer in enumerate(answers):
            tokens = batch["labels"][b][batch["question_index"][b] == q]
            assert tokenizer.decode(tokens) == answer + "<|im_end|>"
        assert int((batch["labels"][b] != -100).sum()) == sum(len(a) + 1 for a in answers)
        routing = int((batch["input_ids"][b] == tokenizer.convert_tokens_to_ids("<|visor_route|>")).sum())
        assert routing == len(answers)  # one routing token after each question
    assert "pixel_values" in batch and batch["image_sizes"].shape[0] == 2


def test_missing_image_is_reported_with_its_record_id(workspace):
    from visor_hf.processing_visor import VisorProcessor

    collator = VisorDataCollator(VisorProcessor.from_pretrained(workspace / "visor"), str(workspace / "images"))
    record = {"id": "lost", "image": "nowhere.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}
    with pytest.raises(ValueError, match="record 'lost': cannot read image .*nowhere.png"):
        collator([record])
    assert to_messages(record)[0]["content"][0] == {"type": "image"}


@pytest.fixture(scope="module")
def stage1(workspace):
    out = workspace / "stage1"
    train_main(["stage1", *args(workspace, workspace / "visor", "--output_dir", str(out), "--max_steps", "3",
                                "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", *COMMON)])
    return out


@pytest.fixture(scope="module")
def universal(workspace, stage1):
    out = workspace / "universal"
    train_main(["universal", *args(workspace, stage1, "--output_dir", str(out), "--max_steps", "12",
                                   "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", *COMMON)])
    return out


@pytest.fixture(scope="module")
def searched(workspace, universal):
    out = workspace / "searched"
    train_main(["search", *args(workspace, universal, "--output_dir", str(out), "--batch_size", "4")])
    return out


def test_stage1_trains_only_the_new_parts(workspace, stage1):
    before, after = load(workspace / "visor").state_dict(), load(stage1).state_dict()
    routing_id = load(stage1).config.routing_token_id
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    embed = "model.language_model.embed_tokens.weight"
    assert changed and all(".cross_attn." in k or k in (embed, "lm_head.weight") for k in changed), changed
    rows_changed = (before[embed] != after[embed]).any(-1).nonzero().flatten().tolist()
    assert rows_changed == [routing_id]  # of the embedding matrix only the routing token's row learnt
    assert any(".gate" in k for k in changed)
    for name in ("config.json", "modeling_visor.py", "processing_visor.py", "tokenizer_config.json"):
        assert (stage1 / name).exists(), name


@pytest.mark.slow
def test_universal_trains_the_language_model_and_draws_every_configuration(stage1, universal):
    before, after = load(stage1).state_dict(), load(universal).state_dict()
    layer = "model.language_model.layers.2.mlp.down_proj.weight"
    assert not torch.equal(before[layer], after[layer])
    vision = [k for k in before if ".vision_tower." in k]
    assert all(torch.equal(before[k], after[k]) for k in vision)  # vision tower frozen by default
    draws = json.loads((universal / "budget_draws.json").read_text())
    assert len(draws) == 12
    assert {tuple(b) for _, b in draws} == {tuple(c) for c in after_config(universal).configurations}


def after_config(path):
    return load(path).config


@pytest.mark.slow
def test_search_writes_viable_configurations_table_and_plot(searched):
    out = searched
    table = json.loads((out / "search.json").read_text())
    assert sorted(tuple(r["self_attn_layers"]) for r in table) == [(), (1,), (1, 4), (4,)]  # every subset of (1, 4)
    viable = [tuple(r["self_attn_layers"]) for r in table if r["viable"]]
    config = after_config(out)
    assert [tuple(c) for c in config.configurations] == sorted(viable, key=lambda c: (len(c), c))
    assert (1, 4) in viable
    assert (out / "search.csv").read_text().startswith("self_attn_layers,")
    assert (out / "search.png").stat().st_size > 1000
    flops = {tuple(r["self_attn_layers"]): r["relative_llm_flops"] for r in table}
    assert flops[()] < flops[(4,)] < flops[(1, 4)] <= 1.0


@pytest.mark.slow
def test_pseudo_labels_are_valid_configurations_one_per_question(workspace, searched):
    labels = workspace / "labels.jsonl"
    train_main(["pseudo-label", *args(workspace, searched, "--output", str(labels))])
    lines = [json.loads(line) for line in labels.read_text().splitlines()]
    configurations = {tuple(c) for c in after_config(searched).configurations}
    assert [line["id"] for line in lines] == [f"r{i}" for i in range(12)] + ["text"]
    for line in lines:
        expected_questions = 2 if line["id"] in ("r0", "r3", "r6", "r9") else 1
        assert len(line["question_labels"]) == expected_questions
        assert all(tuple(q) in configurations for q in line["question_labels"])
        assert tuple(line["self_attn_layers"]) in configurations
        assert set(line["losses"]) == {",".join(map(str, c)) for c in configurations}


@pytest.mark.slow
def test_router_learns_a_learnable_labelling(workspace, searched, tmp_path):
    """Questions ending in 'zzz' need the full configuration, those ending in 'aaa' none: the router must tell."""
    images = workspace / "images"
    records, labels = [], []
    for i in range(40):
        hard = i % 2 == 0
        question = ("z" if hard else "a") * 6
        records.append({"id": f"q{i}", "image": f"{i % 12}.png",
                        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "x"}]})
        label = [4, 1] if hard else []  # a configuration's layers in any order
        labels.append({"id": f"q{i}", "self_attn_layers": label, "question_labels": [label]})
    data, label_file = tmp_path / "router.jsonl", tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    label_file.write_text("".join(json.dumps(line) + "\n" for line in labels))
    out = tmp_path / "routed"
    train_main(["router", "--model", str(searched), "--labels", str(label_file), "--data", str(data),
                "--image_folder", str(images), "--output_dir", str(out), "--max_steps", "40",
                "--per_device_train_batch_size", "8", "--learning_rate", "3e-2", *COMMON])
    result = json.loads((out / "router_eval.json").read_text())
    assert result["held_out_records"] == 8
    assert result["accuracy"] >= 0.9
    before, after = load(searched).state_dict(), load(out).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if ".router." not in k)


@pytest.mark.slow
def test_two_process_universal_run_ends_with_identical_weights(workspace, tmp_path):
    script = tmp_path / "ddp_universal.py"
    script.write_text(
        "import hashlib, os, sys, torch\n"
        "from visor_hf.train import run_training_stage\n"
        "from visor_hf.training import trainer as trainer_module\n"
        "seen = {}\n"
        "class Recording(trainer_module.VisorTrainer):\n"
        "    def train(self, *a, **k):\n"
        "        out = super().train(*a, **k)\n"
        "        digest = hashlib.sha256()\n"
        "        for name, t in sorted(self.model.state_dict().items()):\n"
        "            digest.update(name.encode()); digest.update(t.detach().float().numpy().tobytes())\n"
        "        rank = os.environ['RANK']\n"
        "        open(os.path.join(sys.argv[1], f'rank{rank}.sha'), 'w').write(digest.hexdigest())\n"
        "        return out\n"
        "import visor_hf.train as train_module\n"
        "train_module.VisorTrainer = Recording\n"
        "run_training_stage('universal', sys.argv[2:])\n"
    )
    out = tmp_path / "ddp"
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               str(script), str(tmp_path),
               *args(workspace, workspace / "visor", "--output_dir", str(out), "--max_steps", "4",
                     "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--ddp_backend", "gloo", "--use_cpu", *COMMON)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    hashes = [(tmp_path / f"rank{r}.sha").read_text() for r in range(2)]
    assert hashes[0] == hashes[1]
    assert (out / "config.json").exists()
    before = load(workspace / "visor").state_dict()["model.language_model.layers.2.mlp.down_proj.weight"]
    assert not torch.equal(before, load(out).state_dict()["model.language_model.layers.2.mlp.down_proj.weight"])


def test_stage1_trains_a_visor_tr_packing_layer(workspace, tmp_path):
    out = tmp_path / "packed"
    train_main(["stage1", *args(workspace, workspace / "visor", "--output_dir", str(out), "--max_steps", "2",
                                "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
                                "--token_reduction", "pack", "--pack_factor", "2", *COMMON)])
    model = load(out)
    assert model.config.token_reduction == {"method": "pack", "pack_factor": 2, "keep_ratio": 0.5}
    hidden = model.config.text_config.hidden_size
    mean_init = torch.eye(hidden).repeat(1, 2) / 2
    assert not torch.equal(model.model.token_packer.weight, mean_init)  # it learnt
