"""VISOR's training pipeline on transformers' Trainer (paper, sections 4.2.3 and 4.3).

    python -m visor_hf.train stage1       --model DIR --data F --image_folder D --output_dir OUT [TrainingArguments]
    python -m visor_hf.train universal    --model DIR --data F --image_folder D --output_dir OUT [TrainingArguments]
    python -m visor_hf.train search       --model DIR --data F --image_folder D --output_dir OUT
    python -m visor_hf.train pseudo-label --model DIR --data F --image_folder D --output labels.jsonl
    python -m visor_hf.train router       --model DIR --labels labels.jsonl --data F --image_folder D --output_dir OUT

`stage1` trains the new parts at the full configuration; `universal` fine-tunes the language model drawing
one configuration per step; `search` evaluates subsets of the self-attention layers and writes the viable
ones into the output model's `config.configurations` (plus a CSV/JSON table and a PNG plot);
`pseudo-label` logs every configuration's loss and correctness per question and labels each with the
cheapest configuration that keeps 99 % of the full accuracy; `router` trains the router MLP on those labels.

Training stages accept every `TrainingArguments` flag and run unchanged under `torchrun` or
`accelerate launch` (DDP, FSDP, DeepSpeed). Every stage writes a folder that loads with the Auto classes
and `trust_remote_code=True` (weights, config, processor and the Hub code files).
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import os
import random
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments

from .configuration_visor import VisorConfig, validate_token_reduction
from .modeling_visor import VisorForConditionalGeneration
from .training.data import VisorDataCollator, load_records
from .training.evaluation import evaluate_configurations, select_viable, summarise
from .training.pseudo_labels import configuration_index, pseudo_labels, sample_label
from .training.trainer import RouterTrainer, VisorTrainer, set_trainable


@dataclass
class DataArguments:
    model: str = field(metadata={"help": "A converted VISOR folder (python -m visor_hf.convert_llava_ov) or Hub id."})
    data: str = field(metadata={"help": "JSON or JSONL file of LLaVA-format conversation records."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the records' image paths are relative to."})
    max_length: int | None = field(default=None, metadata={"help": "Refuse batches longer than this many tokens."})


@dataclass
class TrainStageArguments:
    train_vision_tower: bool = field(default=False, metadata={"help": "universal: also fine-tune the vision tower."})
    token_reduction: str | None = field(
        default=None,
        metadata={"help": "'pack' adds (or keeps training) the VISOR-TR packing layer: k consecutive visual tokens "
                  "become one; it becomes the model's default token reduction."},
    )
    pack_factor: int = field(default=2, metadata={"help": "With --token_reduction pack: tokens per packed token."})


@dataclass
class SearchArguments:
    output_dir: str = field(metadata={"help": "Where the model with the viable configurations, table and plot go."})
    batch_size: int = field(default=4, metadata={"help": "Records per forward pass."})
    max_candidates: int = field(
        default=64,
        metadata={"help": "Evaluate every subset of self_attn_layers if there are at most this many; otherwise, "
                  "for each size, the evenly spread subset plus random ones up to this total."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random candidates."})


@dataclass
class PseudoLabelArguments:
    output: str = field(metadata={"help": "labels.jsonl to write, one line per record."})
    batch_size: int = field(default=4, metadata={"help": "Records per forward pass."})
    group_by: str | None = field(
        default=None, metadata={"help": "Record field to aggregate accuracy over (default: per question)."}
    )
    min_relative_accuracy: float = field(default=0.99, metadata={"help": "Share of the full accuracy to keep."})


@dataclass
class RouterArguments:
    labels: str = field(metadata={"help": "labels.jsonl written by the pseudo-label stage."})
    eval_fraction: float = field(default=0.2, metadata={"help": "Share of the records held out to measure accuracy."})


# --------------------------------------------------------------------------------------------------


def load_model_and_processor(path: str):
    from .processing_visor import VisorProcessor

    model = VisorForConditionalGeneration.from_pretrained(path)
    return model, VisorProcessor.from_pretrained(path)


def save_folder(model, processor, output_dir: str) -> None:
    """Weights, config, processor and the Hub code files (which the model's `save_pretrained` writes beside the
    weights): loadable with trust_remote_code=True."""
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def training_arguments(args: TrainingArguments) -> TrainingArguments:
    # The data set holds raw records that the collator turns into tensors; configurations and text-only
    # batches leave some parameters without gradient in a step.
    args.remove_unused_columns = False
    args.ddp_find_unused_parameters = True
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and args.parallel_mode.value != "distributed":
        # Without this every process would train its own copy, silently.
        raise ValueError(
            f"launched as {world_size} processes but Trainer is not distributed (parallel_mode={args.parallel_mode.value}); "
            "on CPU add --use_cpu --ddp_backend gloo"
        )
    return args


def run_training_stage(stage: str, argv: list[str]) -> str:
    parser = HfArgumentParser((DataArguments, TrainStageArguments, TrainingArguments))
    data_args, stage_args, args = parser.parse_args_into_dataclasses(argv)
    args = training_arguments(args)
    dataset = load_records(data_args.data, data_args.image_folder or "")  # every record checked before the model loads
    model, processor = load_model_and_processor(data_args.model)
    if stage_args.token_reduction is not None:
        add_token_packer(model, stage_args.token_reduction, stage_args.pack_factor)
    trainable = set_trainable(model, stage, train_vision_tower=stage_args.train_vision_tower)
    if not trainable:
        raise ValueError(f"{stage}: no parameter to train")
    budgets = ["full"] if stage == "stage1" else [tuple(c) for c in model.config.configurations]
    trainer = VisorTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=VisorDataCollator(processor, data_args.image_folder, data_args.max_length),
        budget_choices=budgets, stage=stage,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if trainer.is_world_process_zero():
        save_folder(trainer.model, processor, args.output_dir)
        with open(os.path.join(args.output_dir, "budget_draws.json"), "w") as f:
            json.dump([[step, list(b) if isinstance(b, tuple) else b] for step, b in trainer.budget_draws], f)
    return args.output_dir


def add_token_packer(model, method: str, factor: int) -> None:
    """Make VISOR-TR packing (k tokens -> 1, starting as their mean) the model's default token reduction."""
    from .modeling_visor import VisorTokenPacker

    if method != "pack":
        raise ValueError(f"--token_reduction {method!r}: only 'pack' is trained; pruning methods need no training")
    setting = validate_token_reduction({"method": "pack", "pack_factor": factor})
    packer = model.model.token_packer
    if packer is not None and packer.factor != factor:
        raise ValueError(f"--pack_factor {factor}: the model already has a packing layer of factor {packer.factor}")
    if packer is None:
        packer = VisorTokenPacker(model.config.text_config.hidden_size, factor)
        model.model.token_packer = packer.to(model.device, model.dtype)
    model.config.token_reduction = setting


def candidate_subsets(layers: list[int], max_candidates: int, seed: int) -> list[tuple]:
    from .configuration_visor import spread_subset

    if 2 ** len(layers) <= max_candidates:
        return [c for k in range(len(layers) + 1) for c in itertools.combinations(layers, k)]
    rng = random.Random(seed)
    candidates = {spread_subset(layers, k) for k in range(len(layers) + 1)}
    while len(candidates) < max_candidates:
        k = rng.randint(1, len(layers) - 1)
        candidates.add(tuple(sorted(rng.sample(layers, k))))
    return sorted(candidates, key=lambda c: (len(c), c))


def relative_flops(config: VisorConfig, configuration: tuple, num_vision_tokens: int = 729 * 5, num_text_tokens: int = 64):
    """LLM prefill FLOPs of a configuration relative to dense LLaVA-OneVision, at a typical anyres image."""
    from .flops import count_flops

    flops = count_flops(config, num_vision_tokens, num_text_tokens, budget=tuple(configuration))
    return flops["visor"]["llm"] / flops["dense"]["llm"]


def run_search(argv: list[str]) -> str:
    data_args, search_args = HfArgumentParser((DataArguments, SearchArguments)).parse_args_into_dataclasses(argv)
    dataset = load_records(data_args.data, data_args.image_folder or "")
    model, processor = load_model_and_processor(data_args.model)
    config = model.config
    full = tuple(config.self_attn_layers)
    candidates = candidate_subsets(config.self_attn_layers, search_args.max_candidates, search_args.seed)
    collator = VisorDataCollator(processor, data_args.image_folder, data_args.max_length)
    rows = evaluate_configurations(model, dataset, collator, candidates, search_args.batch_size)
    summary = summarise(rows, candidates)
    viable = select_viable(summary, full)

    os.makedirs(search_args.output_dir, exist_ok=True)
    candidate_config = copy.deepcopy(config)  # so that count_flops accepts every candidate as a budget
    candidate_config.configurations = [list(c) for c in candidates]
    table = [
        {"self_attn_layers": list(c), "num_layers": len(c), "accuracy": summary[c][0], "loss": summary[c][1],
         "relative_llm_flops": relative_flops(candidate_config, c), "viable": c in viable}
        for c in candidates
    ]
    with open(os.path.join(search_args.output_dir, "search.json"), "w") as f:
        json.dump(table, f, indent=1)
    with open(os.path.join(search_args.output_dir, "search.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows({**row, "self_attn_layers": " ".join(map(str, row["self_attn_layers"]))} for row in table)
    plot_search(table, os.path.join(search_args.output_dir, "search.png"))

    # The router scores config.configurations: a new set of configurations needs a new (untrained) router.
    new_config = VisorConfig.from_dict({**config.to_dict(), "configurations": [list(c) for c in viable]})
    searched = VisorForConditionalGeneration(new_config)
    state = {k: v for k, v in model.state_dict().items() if ".router." not in k}
    missing, unexpected = searched.load_state_dict(state, strict=False)
    if unexpected or any(".router." not in k for k in missing):
        raise RuntimeError(f"search: weights did not carry over (missing {missing}, unexpected {unexpected})")
    save_folder(searched, processor, search_args.output_dir)
    print(f"viable configurations: {viable}")
    return search_args.output_dir


def plot_search(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for viable, style in ((False, dict(c="lightgray", label="candidate")), (True, dict(c="tab:red", label="viable"))):
        rows = [r for r in table if r["viable"] == viable]
        ax.scatter([r["relative_llm_flops"] for r in rows], [r["accuracy"] for r in rows], **style)
    ax.set_xlabel("LLM prefill FLOPs relative to dense LLaVA-OneVision")
    ax.set_ylabel("exact-match accuracy (teacher forced)")
    ax.set_title("VISOR configuration search")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_pseudo_label(argv: list[str]) -> str:
    data_args, label_args = HfArgumentParser((DataArguments, PseudoLabelArguments)).parse_args_into_dataclasses(argv)
    dataset = load_records(data_args.data, data_args.image_folder or "")
    model, processor = load_model_and_processor(data_args.model)
    configurations = [tuple(c) for c in model.config.configurations]
    collator = VisorDataCollator(processor, data_args.image_folder, data_args.max_length)
    rows = evaluate_configurations(
        model, dataset, collator, configurations, label_args.batch_size, label_args.group_by
    )
    labels = pseudo_labels(rows, configurations, label_args.min_relative_accuracy, label_args.group_by)
    by_record: dict = {}
    for row, label in zip(rows, labels):
        by_record.setdefault(row["id"], []).append((row, label))
    os.makedirs(os.path.dirname(os.path.abspath(label_args.output)), exist_ok=True)
    with open(label_args.output, "w") as f:
        for record_id, questions in by_record.items():
            line = {
                "id": record_id,
                "self_attn_layers": list(sample_label([label for _, label in questions], configurations)),
                "question_labels": [list(label) for _, label in questions],
                "losses": {",".join(map(str, c)): [row["loss"][c] for row, _ in questions] for c in configurations},
                "correct": {",".join(map(str, c)): [row["correct"][c] for row, _ in questions] for c in configurations},
            }
            f.write(json.dumps(line) + "\n")
    return label_args.output


class RouterCollator(VisorDataCollator):
    """Adds `router_labels` (B, questions): the index in config.configurations of each question's label."""

    def __init__(self, processor, labels_by_id: dict, **kwargs):
        super().__init__(processor, **kwargs)
        self.labels_by_id = labels_by_id  # record id -> configuration index per question (`read_router_labels`)

    def __call__(self, records):
        batch = super().__call__(records)
        questions = [self.labels_by_id[r["id"]] for r in records]
        width = max(len(q) for q in questions)
        batch["router_labels"] = torch.tensor([q + [-100] * (width - len(q)) for q in questions])
        return batch


def read_router_labels(path: str, configurations) -> dict:
    """labels.jsonl -> {record id: [configuration index per question]}. Every line is checked before training: a
    malformed line, a missing field or a label that is not a configuration (layers in any order) is reported with
    its line number, the first few in one error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--labels {path} does not exist")
    labels, problems = {}, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                labels[entry["id"]] = [configuration_index(label, configurations) for label in entry["question_labels"]]
            except json.JSONDecodeError as error:
                problems.append(f"line {number}: not JSON: {error.msg} (column {error.colno})")
            except (KeyError, TypeError) as error:
                problems.append(f"line {number}: expected {{'id': ..., 'question_labels': [[layers], ...]}} ({error!r})")
            except ValueError as error:
                problems.append(f"line {number} (id {entry.get('id')!r}): {error}")
    if problems:
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(f"--labels {path}: {len(problems)} bad lines:\n  " + "\n  ".join(problems[:5]) + more)
    return labels


@torch.no_grad()
def router_accuracy(model, dataset, collator, batch_size: int = 8) -> float:
    hits = total = 0
    model.eval()
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        targets = batch.pop("router_labels")
        for name in ("labels", "question_index"):
            batch.pop(name)
        out = model(**batch, budget="auto", route_only=True, use_cache=False)
        predicted = out.router_logits[out.routing_mask].argmax(-1)
        expected = targets[targets != -100]
        hits += int((predicted == expected).sum())
        total += expected.numel()
    return hits / max(1, total)


def run_router(argv: list[str]) -> str:
    parser = HfArgumentParser((DataArguments, RouterArguments, TrainingArguments))
    data_args, router_args, args = parser.parse_args_into_dataclasses(argv)
    args = training_arguments(args)
    model, processor = load_model_and_processor(data_args.model)
    if model.config.routing_token_id is None:
        raise ValueError("router: the model has no routing token; convert it with python -m visor_hf.convert_llava_ov")
    labels_by_id = read_router_labels(router_args.labels, model.config.configurations)
    records = load_records(data_args.data, data_args.image_folder or "").filter(lambda r: r["id"] in labels_by_id)
    if len(records) == 0:
        raise ValueError(f"router: no record of --data {data_args.data} has a label in --labels {router_args.labels}")
    split = records.train_test_split(test_size=router_args.eval_fraction, seed=args.seed)
    set_trainable(model, "router")
    collator = RouterCollator(
        processor, labels_by_id, image_folder=data_args.image_folder, max_length=data_args.max_length,
    )
    trainer = RouterTrainer(model=model, args=args, train_dataset=split["train"], data_collator=collator)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    accuracy = router_accuracy(trainer.model, split["test"], collator)
    print(f"router accuracy on {len(split['test'])} held-out records: {accuracy:.3f}")
    if trainer.is_world_process_zero():
        save_folder(trainer.model, processor, args.output_dir)
        with open(os.path.join(args.output_dir, "router_eval.json"), "w") as f:
            json.dump({"held_out_records": len(split["test"]), "accuracy": accuracy}, f)
    return args.output_dir


STAGE_RUNNERS = {
    "stage1": lambda argv: run_training_stage("stage1", argv),
    "universal": lambda argv: run_training_stage("universal", argv),
    "search": run_search,
    "pseudo-label": run_pseudo_label,
    "router": run_router,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGE_RUNNERS:
        raise SystemExit(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_RUNNERS)}")
    STAGE_RUNNERS[stage](rest)


if __name__ == "__main__":
    main()
