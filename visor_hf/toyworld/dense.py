"""Train the toy world's dense baseline: transformers' LLaVA-OneVision from random weights, with `Trainer`.

The model, its processor and the data collator are the ones the VISOR stages use (`VisorDataCollator`: the
chat template rendered per record, answer-only labels), with the dense chat template (no routing token). The
result is written as a LLaVA-OneVision checkpoint folder in transformers 4.x's key layout
(`testing.save_llava_onevision`) with hand-written tokenizer files, which `convert_llava_ov.convert` takes.

Usage:
    train_dense("toy/data", "toy/dense", DenseTrainingOptions(max_steps=2000))
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import datasets
import torch
from transformers import LlavaOnevisionForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

from ..testing import save_llava_onevision
from ..training.data import VisorDataCollator, load_records
from .model import ModelSize, build_tokenizer, dense_config, dense_processor, image_processor, save_tokenizer


class DenseCollator(VisorDataCollator):
    """`VisorDataCollator` for LLaVA-OneVision, whose forward takes no `question_index`."""

    def __call__(self, records):
        batch = super().__call__(records)
        batch.pop("question_index")
        return batch


@dataclass
class DenseTrainingOptions:
    size: ModelSize = field(default_factory=ModelSize)
    max_steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 5e-4  # higher rates blow the visual tokens' norm up (x100 by step 150 at 2e-3)
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    logging_steps: int = 25
    eval_every: int = 0  # > 0: accuracy per family on `eval_split` every this many steps (a learning curve)
    eval_split: str = "test"
    eval_questions: int = 500
    # A curriculum: first `first_steps` steps on `{first_split}.jsonl` (its own warm-up and cosine schedule), then
    # `max_steps` on the training split. (Issue 16 tried it for an earlier world's digit family, which mixed training
    # left at chance: BENCHMARKS.md, "Toy world: can the dense baseline learn every family?".)
    first_split: str | None = None
    first_steps: int = 0
    # An interleaved mix: `{extra_split}.jsonl`'s records shuffled into the training split's (e.g. one family alone,
    # to weigh it more in every batch)
    extra_split: str | None = None


class LearningCurve(TrainerCallback):
    """Every `every` steps (and at the end): the model's accuracy per question family on `records`, appended to
    `points` as {"step": ..., "<family>": accuracy, "all": ..., "coarse": ..., "fine": ...}."""

    def __init__(self, processor, records, image_folder: str, every: int):
        self.processor, self.records, self.image_folder, self.every = processor, records, image_folder, every
        self.points = []
        self.offset = 0  # steps of the training phases already ended (a curriculum trains in two), added to the step

    def measure(self, model, step: int) -> None:
        from .evaluate import evaluate, summarise

        was_training = model.training
        with torch.no_grad():
            summary = summarise(evaluate(model, self.processor, self.records, self.image_folder))
        model.train(was_training)
        self.points.append({"step": step, **{group: entry["accuracy"] for group, entry in summary.items()}})
        print(f"[toyworld] step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in self.points[-1].items() if k != "step"),
              flush=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if (self.offset + state.global_step) % self.every == 0 and state.global_step < state.max_steps:
            self.measure(model, self.offset + state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.measure(model, self.offset + state.global_step)
        self.offset += state.global_step


def load_dense(path: str):
    """(model, processor) of a dense toy checkpoint folder written by `train_dense`."""
    from transformers import AutoTokenizer, PretrainedConfig

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, config=PretrainedConfig())
    return model, dense_processor(tokenizer, image_processor(model.config))


def train_dense(data_dir: str, out_dir: str, options: DenseTrainingOptions | None = None, split: str = "train") -> dict:
    """Train on `{data_dir}/{split}.jsonl`; write the checkpoint to `out_dir` with `training_log.json`
    (Trainer's log history, the options and the wall time). Returns that log."""
    options = options or DenseTrainingOptions()
    torch.manual_seed(options.seed)
    config = dense_config(options.size)
    model = LlavaOnevisionForConditionalGeneration(config)
    tokenizer = build_tokenizer()
    processor = dense_processor(tokenizer, image_processor(config))
    split_records = lambda name: load_records(os.path.join(data_dir, f"{name}.jsonl"))
    curve = None
    if options.eval_every > 0:
        records = split_records(options.eval_split)
        records = records.select(range(min(options.eval_questions, len(records))))
        curve = LearningCurve(processor, records, data_dir, options.eval_every)
    training = split_records(split)
    if options.extra_split:
        training = datasets.concatenate_datasets([training, split_records(options.extra_split)])
    phases = [(split, training, options.max_steps)]
    if options.first_split and options.first_steps > 0:
        phases.insert(0, (options.first_split, split_records(options.first_split), options.first_steps))
    log_history, start = [], time.time()
    for phase_split, records, steps in phases:
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, "trainer"), max_steps=steps,
            per_device_train_batch_size=options.batch_size, learning_rate=options.learning_rate,
            lr_scheduler_type="cosine", warmup_steps=options.warmup_steps, weight_decay=options.weight_decay,
            logging_steps=options.logging_steps, save_strategy="no", report_to="none", remove_unused_columns=False,
            seed=options.seed, use_cpu=True, disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=records,
            data_collator=DenseCollator(processor, image_folder=data_dir), callbacks=[curve] if curve else None,
        )
        trainer.train()
        log_history += [dict(entry, split=phase_split) for entry in trainer.state.log_history]
    seconds = time.time() - start
    model.eval()
    save_llava_onevision(model, out_dir, layout="legacy", tokenizer=tokenizer, image_processor=image_processor(config),
                         license="apache-2.0")
    save_tokenizer(out_dir)  # replace what the running transformers wrote: these files load on 4.57 and 5.x
    log = {"options": asdict(options), "train_seconds": seconds, "log_history": log_history,
           "num_parameters": sum(p.numel() for p in model.parameters()), "curve": curve.points if curve else None}
    with open(os.path.join(out_dir, "training_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    return log
