"""The whole VISOR path on the toy world, stage by stage, with the package's own commands.

    python -m visor_hf.toyworld run --workdir toy_run                       # full run (about 80 minutes on 2 CPU cores)
    python -m visor_hf.toyworld run --workdir toy_run --save-checkpoint --write-docs   # + repo checkpoint, README, BENCHMARKS
    python -m visor_hf.toyworld run --workdir /tmp/t --preset ci            # the CI-sized run (a minute or two)
    python -m visor_hf.toyworld run --workdir toy_run --from search         # resume from a stage
    python -m visor_hf.toyworld run --workdir toy_run --seed 1              # another world and training seed
    python -m visor_hf.toyworld seeds --workdir toy_runs --seeds 0 1 2      # once per seed (in parallel), report over seeds
    python -m visor_hf.toyworld curve --workdir toy_curve                   # the dense baseline's accuracy while it trains

Stages (each writes into the work directory; `commands.sh` there lists the exact commands run):

    data          world.write_world: train (5 questions an image), val (search), label (pseudo-labels), test
    dense         dense.train_dense: LLaVA-OneVision from random weights, transformers' Trainer
    convert       python -m visor_hf.convert_llava_ov --src dense --dst visor --cross-attn-layers .. --self-attn-layers ..
    stage1        python -m visor_hf.train stage1       (new parts only, full configuration)
    universal     python -m visor_hf.train universal    (language model + new parts, one configuration a step)
    search        python -m visor_hf.train search       (every subset of the self-attention layers, on val)
    pseudo-label  python -m visor_hf.train pseudo-label (on label, grouped by question family)
    router        python -m visor_hf.train router       (router MLP on the labels)
    evaluate      evaluate.evaluate on test: dense, every viable configuration, budget="auto"
    report        report.write_report: results.md/json/png (+ README.md/BENCHMARKS.md with --write-docs)
    checkpoint    with --save-checkpoint: the routed model into visor_hf/toyworld/checkpoint/

The training stages are subprocesses, exactly what a user types; the rest runs in this process.

`seeds` runs `run --seed n` per seed as subprocesses (all at once by default, each with cores // jobs torch threads),
then `report.write_seed_report` (mean ± standard deviation, verdicts per seed and per family) and, for the first
seed's model, `fresh_split_check`: its accuracy on a test split of a world drawn with another seed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from .model import ModelSize
from .world import FAMILIES

STAGES = ("data", "dense", "convert", "stage1", "universal", "search", "pseudo-label", "router", "evaluate", "report",
          "checkpoint")
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_DIR = os.path.join(PACKAGE_DIR, "checkpoint")
RESULTS_DIR = os.path.join(PACKAGE_DIR, "results")


@dataclass
class Preset:
    sizes: dict
    questions_per_image: int
    model: ModelSize
    cross_attn_layers: str
    self_attn_layers: str
    dense_steps: int
    dense_lr: float
    stage1_steps: int
    stage1_lr: float
    universal_steps: int
    universal_lr: float
    router_steps: int
    router_lr: float
    batch_size: int
    group_by: str | None = "family"
    reduction_keep_ratio: float = 0.25  # token-reduction rows of the evaluation (issue 8)
    warmup_steps: int = 100
    extra_train_args: list = field(default_factory=list)
    # the dense baseline's curriculum: {"family": ..., "steps": ..., "images": ...}: first `steps` steps on a split
    # ("first") of `images` images asking only `family`, then `dense_steps` on the training split; {}: none
    dense_first: dict = field(default_factory=dict)
    # an interleaved mix for the dense baseline: {"family": ..., "images": ...}: a split ("extra") of `images` images
    # asking only `family`, shuffled into the training split; {}: none
    dense_extra: dict = field(default_factory=dict)


PRESETS = {
    # The checkpoint kept in the repository.
    "full": Preset(
        sizes={"train": 30000, "val": 500, "label": 1500, "test": 1500}, questions_per_image=5, model=ModelSize(),
        cross_attn_layers="1,3,5", self_attn_layers="1,3,5",
        dense_steps=10000, dense_lr=5e-4, stage1_steps=600, stage1_lr=1e-3, universal_steps=3000, universal_lr=2e-4,
        router_steps=300, router_lr=1e-3, batch_size=16,
    ),
    # What tests/test_toyworld.py runs: the same path, tiny everything.
    "ci": Preset(
        sizes={"train": 32, "val": 10, "label": 20, "test": 10}, questions_per_image=5,
        model=ModelSize(vision_hidden=16, text_hidden=32, text_layers=3, text_heads=2, text_kv_heads=1, text_intermediate=64),
        cross_attn_layers="0,2", self_attn_layers="1,2",
        dense_steps=12, dense_lr=3e-3, stage1_steps=3, stage1_lr=3e-3, universal_steps=6, universal_lr=1e-3,
        router_steps=4, router_lr=1e-2, batch_size=8, warmup_steps=2,
    ),
}


class Run:
    """A work directory and the commands run in it."""

    def __init__(self, workdir: str, preset_name: str, seed: int = 0):
        self.workdir = os.path.abspath(workdir)
        self.preset_name = preset_name
        self.preset = PRESETS[preset_name]
        self.seed = seed  # the world's (every split's images and questions) and every training stage's
        os.makedirs(os.path.join(self.workdir, "logs"), exist_ok=True)
        self.timings_path = self.path("timings.json")
        self.timings = json.load(open(self.timings_path)) if os.path.exists(self.timings_path) else {}

    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)

    def record(self, stage: str, seconds: float, command: str | None = None) -> None:
        self.timings[stage] = round(seconds, 1)
        with open(self.timings_path, "w") as f:
            json.dump(self.timings, f, indent=1)
        if command:
            with open(self.path("commands.sh"), "a") as f:
                f.write(f"# {stage} ({seconds:.0f} s)\n{command}\n")

    def shell(self, stage: str, argv: list[str]) -> str:
        """Run `python -m ...` as a subprocess, log to logs/{stage}.log; returns the log text."""
        command = [sys.executable, *argv]
        printable = " ".join(shlex.quote(a) for a in ["python", *argv])
        print(f"[toyworld] {stage}: {printable}", flush=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        start = time.time()
        with open(self.path("logs", f"{stage}.log"), "w") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        text = open(self.path("logs", f"{stage}.log")).read()
        if result.returncode != 0:
            raise RuntimeError(f"{stage} failed (exit {result.returncode}); last lines of its log:\n{text[-3000:]}")
        self.record(stage, time.time() - start, printable)
        return text

    def train_args(self, steps: int, lr: float, batch_size: int | None = None) -> list[str]:
        p = self.preset
        return [
            "--max_steps", str(steps), "--learning_rate", str(lr), "--per_device_train_batch_size",
            str(batch_size or p.batch_size), "--lr_scheduler_type", "cosine", "--warmup_steps",
            str(min(p.warmup_steps, max(1, steps // 10))), "--logging_steps", str(max(1, min(25, steps // 10))),
            "--save_strategy", "no", "--report_to", "none", "--seed", str(self.seed), "--use_cpu", "--disable_tqdm", "true",
            *p.extra_train_args,
        ]


def logged_losses(text: str) -> list[float]:
    """Training losses Trainer printed to a log ({'loss': 1.23, ...} on 4.57, {'loss': '1.23', ...} on 5.x)."""
    return [float(v) for v in re.findall(r"'loss': '?([0-9.]+(?:e-?\d+)?)", text)]


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def write_data(data_dir: str, p: Preset, sizes: dict, seed: int, dense_first: dict, dense_extra: dict) -> None:
    """`sizes`' splits of the world, plus the dense baseline's curriculum ("first") and interleaved ("extra")
    splits, each asking its one family."""
    from .world import write_world

    families = {}
    for name, setting in (("first", dense_first), ("extra", dense_extra)):
        if setting:
            sizes, families[name] = {**sizes, name: setting["images"]}, (setting["family"],)
    write_world(data_dir, sizes, seed=seed, questions_per_image={"train": p.questions_per_image}, families=families)


def dense_options(p: Preset, seed: int, steps: int, dense_first: dict, dense_extra: dict, **more):
    """The dense baseline's `DenseTrainingOptions` for preset `p` (its model, batch, learning rate, warm-up)."""
    from .dense import DenseTrainingOptions

    if dense_first:
        more.update(first_split="first", first_steps=dense_first["steps"])
    if dense_extra:
        more.update(extra_split="extra")
    return DenseTrainingOptions(size=p.model, max_steps=steps, batch_size=p.batch_size, learning_rate=p.dense_lr,
                                warmup_steps=p.warmup_steps, seed=seed, logging_steps=max(1, min(25, steps // 10)), **more)


def stage_data(run: Run) -> None:
    start = time.time()
    p = run.preset
    write_data(run.path("data"), p, p.sizes, run.seed, p.dense_first, p.dense_extra)
    run.record("data", time.time() - start)


def stage_dense(run: Run) -> None:
    from .dense import train_dense

    p = run.preset
    options = dense_options(p, run.seed, p.dense_steps, p.dense_first, p.dense_extra)
    start = time.time()
    train_dense(run.path("data"), run.path("dense"), options)
    run.record("dense", time.time() - start)
    shutil.rmtree(run.path("dense", "trainer"), ignore_errors=True)


def stage_convert(run: Run) -> None:
    p = run.preset
    shutil.rmtree(run.path("visor"), ignore_errors=True)
    run.shell("convert", ["-m", "visor_hf.convert_llava_ov", "--src", "dense", "--dst", "visor", "--cross-attn-layers",
                          p.cross_attn_layers, "--self-attn-layers", p.self_attn_layers, "--no-progress"])


def data_args(split: str) -> list[str]:
    return ["--data", f"data/{split}.jsonl", "--image_folder", "data"]


def stage_train(run: Run, stage: str) -> None:
    p = run.preset
    source, steps, lr = {"stage1": ("visor", p.stage1_steps, p.stage1_lr),
                         "universal": ("stage1", p.universal_steps, p.universal_lr)}[stage]
    run.shell(stage, ["-m", "visor_hf.train", stage, "--model", source, *data_args("train"), "--output_dir", stage,
                      *run.train_args(steps, lr)])


def stage_search(run: Run) -> None:
    run.shell("search", ["-m", "visor_hf.train", "search", "--model", "universal", *data_args("val"),
                         "--output_dir", "searched", "--batch_size", "32"])


def stage_pseudo_label(run: Run) -> None:
    group = ["--group_by", run.preset.group_by] if run.preset.group_by else []
    run.shell("pseudo-label", ["-m", "visor_hf.train", "pseudo-label", "--model", "searched", *data_args("label"),
                               "--output", "labels.jsonl", "--batch_size", "32", *group])


def stage_router(run: Run) -> None:
    p = run.preset
    run.shell("router", ["-m", "visor_hf.train", "router", "--model", "searched", "--labels", "labels.jsonl",
                         *data_args("label"), "--output_dir", "final",
                         *run.train_args(p.router_steps, p.router_lr, batch_size=2 * p.batch_size)])


def stage_evaluate(run: Run) -> None:
    import torch

    from ..modeling_visor import VisorForConditionalGeneration
    from ..processing_visor import VisorProcessor
    from .dense import load_dense
    from .evaluate import evaluate, summarise
    from .world import load_split

    start = time.time()
    test = load_split(run.path("data"), "test")
    folder = run.path("data")
    results = {"budgets": {}, "rows": {}}
    with torch.inference_mode():
        dense, dense_processor = load_dense(run.path("dense"))
        rows = evaluate(dense, dense_processor, test, folder)
        results["dense"], results["rows"]["dense"] = summarise(rows), rows
        del dense
        model = VisorForConditionalGeneration.from_pretrained(run.path("final")).eval()
        processor = VisorProcessor.from_pretrained(run.path("final"))
        budgets = [tuple(c) for c in model.config.configurations] + ["auto"]
        for budget in budgets:
            name = budget if budget == "auto" else str(budget)
            rows = evaluate(model, processor, test, folder, budget=budget)
            results["budgets"][name], results["rows"][name] = summarise(rows), rows
            print(f"[toyworld] evaluate {name}: accuracy {results['budgets'][name]['all']['accuracy']:.3f}", flush=True)
        results["reduction"] = evaluate_token_reduction(run, model, processor, results, test, folder)
    config = model.config
    results["model"] = {
        "num_layers": config.num_layers, "cross_attn_layers": config.cross_attn_layers,
        "self_attn_layers": config.self_attn_layers, "configurations": config.configurations,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dense_num_parameters": json.load(open(run.path("dense", "training_log.json")))["num_parameters"],
    }
    results["machine"] = machine_description()
    results["preset"] = run.preset_name
    results["seed"] = run.seed
    with open(run.path("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    run.record("evaluate", time.time() - start)


def evaluate_token_reduction(run: Run, model, processor, results: dict, test, folder: str) -> list[dict]:
    """Issue 8's rows: training-free pruning (VisionZip-, VisPruner-style) on VISOR (full budget and "auto") and on
    the dense model, at the preset's keep ratio, plus dense + VisionZip at the keep ratio that costs what VISOR
    "auto" costs on average (matched FLOPs). The toy vision tower has one layer: its attention scores the tokens.
    One entry per row: name, base ("dense", "VISOR full", "VISOR auto"), method, keep_ratio, matched (None, or
    whether dense + pruning reached VISOR auto's FLOPs: newline tokens are always kept) and the summary."""
    from ..baselines import TokenReducedLlavaOnevision
    from ..flops import count_flops, keep_ratio_for_flops
    from .dense import load_dense
    from .evaluate import evaluate, summarise
    from .world import CANVAS

    ratio = run.preset.reduction_keep_ratio
    dense, dense_processor = load_dense(run.path("dense"))
    full = tuple(model.config.configurations[-1])  # the largest configuration, as `report.fixed_budgets` orders them
    # matched FLOPs: every toy image has one size and prompts differ by a word or two, so the first question stands
    # for all (its text tokens less VISOR's routing token, which the dense prompt lacks)
    first = results["rows"]["auto"][0]
    target = results["budgets"]["auto"]["all"]["relative_flops"] * first["dense_llm_flops"]
    num_text = first["num_text_tokens"] - 1
    matched = keep_ratio_for_flops(dense.config, (CANVAS, CANVAS), num_text, "visionzip", target, score_layer=0)
    reached_flops = count_flops(dense.config, first["num_vision_tokens"], num_text, "full", image_size=(CANVAS, CANVAS),
                                token_reduction={"method": "visionzip", "keep_ratio": matched})["dense"]["llm"]
    runs = []
    for method in ("visionzip", "vispruner"):
        setting = {"method": method, "keep_ratio": ratio, "score_layer": 0}
        runs += [("VISOR full", method, ratio, None, model, processor, full, setting),
                 ("VISOR auto", method, ratio, None, model, processor, "auto", setting),
                 ("dense", method, ratio, None, TokenReducedLlavaOnevision(dense, setting), dense_processor, None, None)]
    setting = {"method": "visionzip", "keep_ratio": matched, "score_layer": 0}
    runs.append(("dense", "visionzip", matched, abs(reached_flops - target) <= 0.02 * target,
                 TokenReducedLlavaOnevision(dense, setting), dense_processor, None, None))
    entries = []
    for base, method, keep_ratio, reached, evaluated, evaluated_processor, budget, setting in runs:
        name = f"{base} + {method} @ {keep_ratio:.3g}" + ("" if reached is None else " (matched to VISOR auto)")
        rows = evaluate(evaluated, evaluated_processor, test, folder, budget=budget, token_reduction=setting)
        entries.append({"name": name, "base": base, "method": method, "keep_ratio": keep_ratio, "matched": reached,
                        "summary": summarise(rows)})
        results["rows"][name] = rows
        print(f"[toyworld] evaluate {name}: accuracy {entries[-1]['summary']['all']['accuracy']:.3f}", flush=True)
    return entries


def machine_description() -> dict:
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}


def stage_report(run: Run, write_docs: bool) -> None:
    from .report import write_report

    write_report(run.workdir, results_dir=RESULTS_DIR if write_docs else run.path("report"), write_docs=write_docs)


def stage_checkpoint(run: Run, destination: str = CHECKPOINT_DIR) -> None:
    from .report import save_checkpoint

    save_checkpoint(run.workdir, destination)


def run_pipeline(workdir: str, preset: str = "full", first: str = "data", last: str = "report",
                 write_docs: bool = False, save_checkpoint_to: str | None = None, seed: int = 0) -> Run:
    run = Run(workdir, preset, seed)
    stages = STAGES[STAGES.index(first) : STAGES.index(last) + 1]
    with open(run.path("preset.json"), "w") as f:
        json.dump({"name": preset, "seed": seed, **asdict(run.preset)}, f, indent=1)
    for stage in stages:
        print(f"[toyworld] === {stage} ===", flush=True)
        if stage == "data":
            stage_data(run)
        elif stage == "dense":
            stage_dense(run)
        elif stage == "convert":
            stage_convert(run)
        elif stage in ("stage1", "universal"):
            stage_train(run, stage)
        elif stage == "search":
            stage_search(run)
        elif stage == "pseudo-label":
            stage_pseudo_label(run)
        elif stage == "router":
            stage_router(run)
        elif stage == "evaluate":
            stage_evaluate(run)
        elif stage == "report":
            stage_report(run, write_docs)
        elif stage == "checkpoint" and save_checkpoint_to:
            stage_checkpoint(run, save_checkpoint_to)
    return run


# --------------------------------------------------------------------------------------------------
# Several seeds, and the kept checkpoint on a fresh world
# --------------------------------------------------------------------------------------------------


def fresh_split_check(model_dir: str, reported: dict, data_dir: str, world_seed: int, size: int,
                      tolerance: float = 0.05) -> dict:
    """Evaluate the VISOR model in `model_dir` on a test split of a world drawn with `world_seed` (written to
    `data_dir`) at every budget `reported` has, and compare its accuracy per kind with `reported` (a run's
    results.json). Returns {"world_seed", "questions", "tolerance", "budgets": {name: {kind: {"reported", "fresh",
    "difference"}}}, "within"}: within is whether every |difference| <= tolerance."""
    import torch

    from ..modeling_visor import VisorForConditionalGeneration
    from ..processing_visor import VisorProcessor
    from .evaluate import evaluate, summarise
    from .world import load_split, write_world

    write_world(data_dir, {"test": size}, seed=world_seed)
    test = load_split(data_dir, "test")
    model = VisorForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = VisorProcessor.from_pretrained(model_dir)
    check = {"world_seed": world_seed, "questions": size, "tolerance": tolerance, "budgets": {}}
    with torch.inference_mode():
        for name, summary in reported["budgets"].items():
            budget = "auto" if name == "auto" else ast.literal_eval(name)  # names are str(tuple of layers)
            fresh = summarise(evaluate(model, processor, test, data_dir, budget=budget))
            check["budgets"][name] = {
                kind: {"reported": summary[kind]["accuracy"], "fresh": fresh[kind]["accuracy"],
                       "difference": fresh[kind]["accuracy"] - summary[kind]["accuracy"]}
                for kind in ("all", "coarse", "fine")
            }
    check["within"] = all(abs(e["difference"]) <= tolerance for kinds in check["budgets"].values() for e in kinds.values())
    return check


def finished_run(workdir: str, preset: str, seed: int) -> bool:
    """Whether `workdir` holds a finished run (results.json) of `preset` with `seed`. A finished run made with other
    settings than the preset's today (its preset.json) is an error: reusing it would report a recipe that did not run."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return False
    results = json.load(open(path))
    if results.get("preset") != preset or results.get("seed") != seed:
        return False
    ran = json.load(open(os.path.join(workdir, "preset.json")))
    today = json.loads(json.dumps(asdict(PRESETS[preset])))
    changed = sorted(k for k in today if ran.get(k) != today[k])
    if changed:
        raise ValueError(f"{workdir} holds a finished run of preset {preset!r} made with other settings than today's: "
                         + ", ".join(f"{k} {ran.get(k)!r} (today {today[k]!r})" for k in changed)
                         + ". Use another --workdir, or delete that folder to run the seed again.")
    return True


def run_seeds(workdir: str, preset: str = "full", seeds=(0, 1, 2), jobs: int | None = None, write_docs: bool = False,
              save_checkpoint_to: str | None = None, fresh_world_seed: int = 1000) -> None:
    """The whole pipeline once per seed (`{workdir}/seed{n}`, each a `run --seed n` subprocess, `jobs` at a time with
    cores // jobs torch threads each), then: the report over seeds (the first seed's run is the kept one), its
    checkpoint, and that checkpoint on a fresh test split of a world drawn with `fresh_world_seed`. A seed whose
    folder already has results.json (a finished run of the same preset) is not run again: seeds can be spread over
    several sittings."""
    from .report import write_seed_report

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    jobs = jobs or len(seeds)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    start, running = time.time(), []
    reused = [seed for seed in seeds if finished_run(os.path.join(workdir, f"seed{seed}"), preset, seed)]
    pending = [seed for seed in seeds if seed not in reused]
    if reused:
        print(f"[toyworld] seeds {reused} already done (their results.json); running {pending}", flush=True)
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            argv = [sys.executable, "-m", "visor_hf.toyworld", "run", "--workdir", os.path.join(workdir, f"seed{seed}"),
                    "--preset", preset, "--seed", str(seed), "--to", "report"]
            print(f"[toyworld] seed {seed}: {' '.join(argv[1:])} (log {workdir}/seed{seed}.log)", flush=True)
            log = open(os.path.join(workdir, f"seed{seed}.log"), "w")
            running.append((seed, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(5)
        for entry in list(running):
            seed, process, log = entry
            if process.poll() is not None:
                log.close()
                running.remove(entry)
                if process.returncode != 0:
                    for _, other, _ in running:
                        other.kill()
                    tail = open(os.path.join(workdir, f"seed{seed}.log")).read()[-3000:]
                    raise RuntimeError(f"seed {seed} failed (exit {process.returncode}); last lines of its log:\n{tail}")
                print(f"[toyworld] seed {seed} done after {(time.time() - start) / 60:.1f} min", flush=True)
    seed_dirs = [os.path.join(workdir, f"seed{seed}") for seed in seeds]
    command = (f"python -m visor_hf.toyworld seeds --workdir {os.path.basename(workdir)} --preset {preset} --seeds "
               + " ".join(map(str, seeds)) + f" --jobs {jobs}")
    timings = {seed: json.load(open(os.path.join(d, "timings.json"))) for seed, d in zip(seeds, seed_dirs)}
    with open(os.path.join(workdir, "seeds.json"), "w") as f:
        json.dump({"seeds": list(seeds), "jobs": jobs, "threads": threads, "seconds": time.time() - start,
                   "reused": reused,
                   "command": command, "timings": timings}, f, indent=1)
    kept = seed_dirs[0]
    print(f"[toyworld] fresh split: seed {seeds[0]}'s model on a world drawn with seed {fresh_world_seed}", flush=True)
    reported = json.load(open(os.path.join(kept, "results.json")))
    check = fresh_split_check(os.path.join(kept, "final"), reported, os.path.join(workdir, "fresh_data"), fresh_world_seed,
                              PRESETS[preset].sizes["test"])
    with open(os.path.join(workdir, "fresh_split.json"), "w") as f:
        json.dump(check, f, indent=1)
    write_seed_report(workdir, seed_dirs, results_dir=RESULTS_DIR if write_docs else os.path.join(workdir, "report"),
                      write_docs=write_docs)
    if save_checkpoint_to:
        stage_checkpoint(Run(kept, preset, seeds[0]), save_checkpoint_to)


# --------------------------------------------------------------------------------------------------
# The dense baseline's learning curve
# --------------------------------------------------------------------------------------------------


def learning_curve(workdir: str, preset: str = "full", steps: int | None = None,
                   eval_every: int = 500, seed: int = 0, questions: int = 500, dense_first: dict | None = None,
                   dense_extra: dict | None = None) -> list[dict]:
    """Train only the dense baseline of `preset` (its model, batch, learning rate; `steps` or the preset's),
    measuring its accuracy per family on `questions` test questions every `eval_every` steps:
    how long the baseline needs to learn each family. Writes curve.json, curve.md and curve.png in `workdir`."""
    from .dense import train_dense

    p = PRESETS[preset]
    dense_first = p.dense_first if dense_first is None else dense_first
    dense_extra = p.dense_extra if dense_extra is None else dense_extra
    workdir = os.path.abspath(workdir)
    start = time.time()
    write_data(os.path.join(workdir, "data"), p, {"train": p.sizes["train"], "test": questions}, seed, dense_first,
               dense_extra)
    options = dense_options(p, seed, steps or p.dense_steps, dense_first, dense_extra, eval_every=eval_every,
                            eval_questions=questions)
    log = train_dense(os.path.join(workdir, "data"), os.path.join(workdir, "dense"), options)
    shutil.rmtree(os.path.join(workdir, "dense", "trainer"), ignore_errors=True)
    points = log["curve"]
    info = {"preset": preset, "dense_first": dense_first, "dense_extra": dense_extra,
            "steps": options.max_steps, "seed": seed,
            "questions": questions,
            "seconds": time.time() - start, "machine": machine_description(), "curve": points}
    with open(os.path.join(workdir, "curve.json"), "w") as f:
        json.dump(info, f, indent=1)
    header = "| step | " + " | ".join(FAMILIES) + " | all |"
    rows = [f"| {pt['step']} | " + " | ".join(f"{100 * pt.get(f, 0.0):.1f}" for f in FAMILIES) + f" | {100 * pt['all']:.1f} |"
            for pt in points]
    with open(os.path.join(workdir, "curve.md"), "w") as f:
        f.write("\n".join([header, "| --- |" + " ---: |" * (len(FAMILIES) + 1), *rows]) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for family in FAMILIES:
        ax.plot([pt["step"] for pt in points], [100 * pt.get(family, 0.0) for pt in points], "o-", ms=3, label=family)
    ax.axhline(90, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("training step (batch %d)" % p.batch_size)
    ax.set_ylabel("test accuracy (%%, %d questions)" % questions)
    if dense_first:
        ax.axvline(dense_first["steps"], color="grey", lw=0.8)
    first = f", first {dense_first['steps']} steps {dense_first['family']} only" if dense_first else ""
    first += f", + {dense_extra['images']} {dense_extra['family']}-only records" if dense_extra else ""
    ax.set_title(f"dense baseline, preset {preset}{first}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "curve.png"), dpi=120)
    plt.close(fig)
    return points


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m visor_hf.toyworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="Run the pipeline (or part of it) in a work directory.")
    run_parser.add_argument("--workdir", required=True)
    run_parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    run_parser.add_argument("--from", dest="first", default="data", choices=STAGES)
    run_parser.add_argument("--to", dest="last", default="checkpoint", choices=STAGES)
    run_parser.add_argument("--write-docs", action="store_true",
                            help="Write the results into visor_hf/toyworld/results/, README.md and BENCHMARKS.md.")
    run_parser.add_argument("--save-checkpoint", nargs="?", const=CHECKPOINT_DIR, default=None, metavar="DIR",
                            help=f"Copy the routed model to DIR (default {CHECKPOINT_DIR}).")
    run_parser.add_argument("--seed", type=int, default=0, help="The world's seed and every training stage's (default 0).")
    seeds_parser = sub.add_parser("seeds", help="The whole pipeline once per seed, then the report over seeds.")
    seeds_parser.add_argument("--workdir", required=True)
    seeds_parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    seeds_parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                              help="Seeds (default 0 1 2); the first one's model is the kept checkpoint.")
    seeds_parser.add_argument("--jobs", type=int, default=None, help="Seeds run at once (default: all of them).")
    seeds_parser.add_argument("--fresh-world-seed", type=int, default=1000,
                              help="World seed of the fresh test split the kept model is checked on (default 1000).")
    seeds_parser.add_argument("--write-docs", action="store_true",
                              help="Write the results into visor_hf/toyworld/results/, README.md and BENCHMARKS.md.")
    seeds_parser.add_argument("--save-checkpoint", nargs="?", const=CHECKPOINT_DIR, default=None, metavar="DIR",
                              help=f"Copy the first seed's routed model to DIR (default {CHECKPOINT_DIR}).")
    curve_parser = sub.add_parser("curve", help="The dense baseline's accuracy per family while it trains.")
    curve_parser.add_argument("--workdir", required=True)
    curve_parser.add_argument("--preset", default="full", choices=sorted(PRESETS))
    curve_parser.add_argument("--steps", type=int, default=None, help="Training steps (default: the preset's dense_steps).")
    curve_parser.add_argument("--eval-every", type=int, default=500)
    curve_parser.add_argument("--questions", type=int, default=500, help="Test questions a measurement (default 500).")
    curve_parser.add_argument("--seed", type=int, default=0)
    curve_parser.add_argument("--first-family", default=None, choices=list(FAMILIES),
                              help="A curriculum: train on this family alone first (default: the preset's dense_first).")
    curve_parser.add_argument("--first-steps", type=int, default=1000, help="with --first-family: its steps (default 1000)")
    curve_parser.add_argument("--first-images", type=int, default=16000, help="with --first-family: its images (default 16000)")
    curve_parser.add_argument("--extra-family", default=None, choices=list(FAMILIES),
                              help="An interleaved mix: records asking only this family, shuffled into the training split.")
    curve_parser.add_argument("--extra-images", type=int, default=30000, help="with --extra-family: its records (default 30000)")
    report_parser = sub.add_parser("report", help="Regenerate the table, plot and docs from a finished run.")
    report_parser.add_argument("--workdir", required=True)
    report_parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "run":
        run_pipeline(args.workdir, args.preset, args.first, args.last, args.write_docs, args.save_checkpoint, args.seed)
    elif args.command == "curve":
        first = {"family": args.first_family, "steps": args.first_steps, "images": args.first_images} if args.first_family else None
        extra = {"family": args.extra_family, "images": args.extra_images} if args.extra_family else None
        learning_curve(args.workdir, args.preset, args.steps, args.eval_every, args.seed, args.questions, first, extra)
    elif args.command == "seeds":
        if len(set(args.seeds)) != len(args.seeds) or args.fresh_world_seed in args.seeds:
            parser.error(f"--seeds {args.seeds} must differ from each other and from --fresh-world-seed {args.fresh_world_seed}")
        run_seeds(args.workdir, args.preset, args.seeds, args.jobs, args.write_docs, args.save_checkpoint,
                  args.fresh_world_seed)
    else:
        stage_report(Run(args.workdir, json.load(open(os.path.join(args.workdir, "preset.json")))["name"]), args.write_docs)
