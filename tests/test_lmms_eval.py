"""lmms-eval's `--model visor` (visor_hf/lmms_eval_visor.py) on the toy-world checkpoint, offline.

A local lmms-eval task (toy-world test questions as a JSONL file and PNGs in tmp_path, a task YAML with
`dataset_path: json`) runs through lmms-eval's own CLI. The answers it logs must be what `model.generate` gives
for the same chat prompts, each sample's self-attention layers must be in its log, and its accuracy must beat
chance. The plugin is also called directly with a batch mixing budgets (one per request, from the task's
generation settings), which must answer as each sample does alone.

lmms-eval is installed with `pip install --no-deps lmms-eval==0.7.3` plus the `eval` extra (see .ci/run); the
tests are skipped only where lmms-eval cannot be imported.
"""

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install --no-deps lmms-eval==0.7.3)")

from visor_hf import VisorForConditionalGeneration, VisorProcessor  # noqa: E402
from visor_hf.demo import DEFAULT_MODEL  # noqa: E402
from visor_hf.toyworld import world  # noqa: E402

NUM_QUESTIONS = 10  # two of each of the five question families
TASK = "toy_visor"
# chance of guessing each family's one-word answer: 5 colours, 3 shapes, left/right, 0-4 small shapes (twice)
CHANCE = sum([1 / 5, 1 / 3, 1 / 2, 1 / 5, 1 / 5]) / 5

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

UTILS = """\
from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]
"""


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
    """A task folder for `--include_path` and the questions it holds."""
    folder = tmp_path_factory.mktemp("lmms_task")
    records = []
    for record, image in world.split_records("test", NUM_QUESTIONS, seed=0):
        path = str(folder / f"{record['id']}.png")
        image.save(path)
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        records.append({"id": record["id"], "family": record["family"], "image": path, "question": question,
                        "answer": record["conversations"][1]["value"]})
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    (folder / "utils.py").write_text(UTILS)
    return folder, records


@pytest.fixture(scope="module")
def toy_model():
    model = VisorForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()
    return model, VisorProcessor.from_pretrained(DEFAULT_MODEL)


def direct_answers(model, processor, records, budget, token_reduction=None) -> tuple[list[str], list[tuple]]:
    """`model.generate`'s greedy answers for the chat prompts, one question at a time, and the layers that ran."""
    from PIL import Image

    answers, layers = [], []
    for record in records:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        with Image.open(record["image"]) as image:
            inputs = dict(processor(images=image.convert("RGB"), text=prompt, return_tensors="pt"))
        with torch.no_grad():
            out = model(**inputs, budget=budget, use_cache=False, token_reduction=token_reduction)
            tokens = model.generate(**inputs, budget=budget, max_new_tokens=4, do_sample=False, token_reduction=token_reduction,
                                    pad_token_id=processor.tokenizer.pad_token_id)
        answers.append(processor.tokenizer.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        layers.append(tuple(out.self_attn_layers[0]))
    return answers, layers


def run_cli(task_folder, output, model_args: str):
    """lmms-eval's CLI, offline, from a neutral folder (so that the installed package metadata is what it reads)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(output / "datasets_cache")}
    command = [sys.executable, "-m", "lmms_eval", "--model", "visor", "--model_args", model_args, "--tasks", TASK,
               "--include_path", str(task_folder), "--output_path", str(output), "--log_samples", "--verbosity", "INFO"]
    result = subprocess.run(command, cwd=output, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def read_outputs(output) -> tuple[dict, dict]:
    """The results JSON and the logged samples by doc_id (the CLI exits 0 even when the evaluation fails, so a
    missing file is the failure)."""
    results = glob.glob(str(output / "**" / "*results.json"), recursive=True)
    samples = glob.glob(str(output / "**" / f"*samples_{TASK}.jsonl"), recursive=True)
    assert results and samples, f"no results/samples under {output}: {sorted(glob.glob(str(output / '**'), recursive=True))}"
    with open(samples[0]) as f:
        rows = [json.loads(line) for line in f]
    with open(results[0]) as f:
        return json.load(f), {row["doc_id"]: row for row in rows}


def test_cli_answers_as_generate_and_logs_layers(toy_task, toy_model, tmp_path):
    task_folder, records = toy_task
    cost_log = tmp_path / "costs.jsonl"
    log = run_cli(task_folder, tmp_path, f"pretrained={DEFAULT_MODEL},budget=auto,batch_size=4,device=cpu,cost_log={cost_log}")
    results, samples = read_outputs(tmp_path)

    answers, layers = direct_answers(*toy_model, records, budget="auto")
    assert [samples[i]["filtered_resps"] for i in range(len(records))] == answers
    accuracy = results["results"][TASK]["exact_match,none"]
    assert accuracy == sum(a == r["answer"] for a, r in zip(answers, records)) / len(records)
    assert accuracy > CHANCE + 0.25, (accuracy, CHANCE)

    costs = {row["doc_id"]: row for row in map(json.loads, cost_log.read_text().splitlines())}
    assert sorted(costs) == list(range(len(records)))
    assert len(set(layers)) > 1  # the router picks different configurations for these questions
    for doc_id, row in costs.items():
        assert tuple(row["self_attn_layers"]) == layers[doc_id]
        assert row["answer"] == answers[doc_id] and row["fewer_than_dense"] > 1
        assert f"visor {TASK}/{doc_id}: budget auto, self-attention layers {row['self_attn_layers']}" in log
    assert "x fewer FLOPs than dense in total" in log


def make_requests(lm, records, budgets):
    """lmms-eval Instances as its evaluator builds them for a generate_until task over the records."""
    from lmms_eval.api.instance import Instance
    from PIL import Image

    def doc_to_visual(doc):
        with Image.open(doc["image"]) as image:
            return [image.convert("RGB")]

    lm.task_dict = {TASK: {"test": records}}
    requests = []
    for i, (record, budget) in enumerate(zip(records, budgets)):
        settings = {"max_new_tokens": 4, "temperature": 0, "until": ["\n"], **({} if budget is None else {"budget": budget})}
        args = (record["question"], settings, doc_to_visual, i, TASK, "test")
        requests.append(Instance(request_type="generate_until", arguments=args, idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1}))
    return requests


def test_batch_mixing_budgets_answers_as_each_alone(toy_task, toy_model):
    from visor_hf.lmms_eval_visor import Visor

    _, records = toy_task
    records = records[:5]
    budgets = ["auto", 0, "full", 2, "auto"]
    lm = Visor.create_from_arg_string(f"pretrained={DEFAULT_MODEL},batch_size=5", {"batch_size": 1, "device": None})
    assert lm.batch_size == 5 and len(lm.batches(make_requests(lm, records, budgets))) == 1
    batched = lm.generate_until(make_requests(lm, records, budgets))
    for i, budget in enumerate(budgets):
        assert batched[i] == direct_answers(*toy_model, records[i : i + 1], budget)[0][0]
    assert [len(row["self_attn_layers"]) for row in lm.sample_costs[1:4]] == [0, 3, 2]
    dense = lm.sample_costs[0]["dense_llm_flops"]
    assert lm.sample_costs[1]["visor_llm_flops"] < lm.sample_costs[3]["visor_llm_flops"] < lm.sample_costs[2]["visor_llm_flops"] < dense


def test_token_reduction_from_model_args(toy_task, toy_model):
    """A JSON setting in --model_args (the toy vision tower has one layer, so VisionZip scores at layer -1); the
    FLOPs logged count the kept tokens, against dense on all of them."""
    from visor_hf.lmms_eval_visor import Visor

    _, records = toy_task
    records = records[:4]
    setting = {"method": "visionzip", "keep_ratio": 0.5, "score_layer": -1}
    lm = Visor.create_from_arg_string(f"pretrained={DEFAULT_MODEL},budget=0,batch_size=4,token_reduction={json.dumps(setting)}")
    assert lm.token_reduction == setting
    answers = lm.generate_until(make_requests(lm, records, [None] * len(records)))
    assert answers == direct_answers(*toy_model, records, 0, token_reduction=setting)[0]
    for row in lm.sample_costs:
        assert row["budget"] == 0 and row["self_attn_layers"] == []
        assert row["num_vision_tokens_kept"] < row["num_vision_tokens"] and row["fewer_than_dense"] > 1


def test_model_args_are_checked(tmp_path):
    from visor_hf.lmms_eval_visor import Visor, parse_budget, parse_token_reduction

    assert parse_budget(0) == 0 and parse_budget("full") == "full"
    assert parse_token_reduction("visionzip:0.25") == {"method": "visionzip", "keep_ratio": 0.25}
    assert parse_token_reduction("pack:4") == {"method": "pack", "pack_factor": 4}
    with pytest.raises(ValueError, match="auto, full or a number"):
        parse_budget("some")
    with pytest.raises(ValueError, match="METHOD:AMOUNT"):
        parse_token_reduction("fastv:0.5")
    with pytest.raises(ValueError, match="keep_ratio"):
        parse_token_reduction("visionzip:2")
    with pytest.raises(ValueError, match="unknown model_args \\['budgett'\\]"):
        Visor(pretrained=DEFAULT_MODEL, budgett=0)
    assert Visor(pretrained=DEFAULT_MODEL).budget == "full"  # the toy checkpoint's default_budget
    lm = Visor(pretrained=DEFAULT_MODEL, budget=0)
    with pytest.raises(NotImplementedError, match="generate_until tasks only"):
        lm.loglikelihood([])
