#!/usr/bin/env python
"""Prefill, decode, memory and FLOPs of VISOR against dense LLaVA-OneVision on the same random weights.

A LLaVA-OneVision with the shapes of llava-onevision-qwen2-0.5b (Qwen2-0.5B language model; SigLIP-400M at
384 px, patch 14, the 26 layers LLaVA-OV keeps, or a one-layer tower with --tiny-vision) is built with random
weights; VISOR is grafted onto the same weights with `VisorForConditionalGeneration.from_llava_onevision`
(8 cross-attention + 8 self-attention layers). Dense is transformers' own `LlavaOnevisionForConditionalGeneration`.
Weights are random: timings do not depend on their values.

What is measured, for each visual-token count N_v (prompt: N_t text tokens around one image of N_v tokens):
- vision encoder: SigLIP (all layers) + projector on round(N_v / 729) crops, the compute of LLaVA-OV's
  `get_image_features` without its anyres packing (reshapes and newline tokens). Both models run this very
  module (VISOR calls LLaVA-OV's `get_image_features`), so it is measured once per N_v and shared.
- LLM prefill: `model(input_ids, pixel_values, image_sizes, use_cache=True, logits_to_keep=1[, budget])` with
  the instance's image-feature function (`get_image_features` of dense, `visual_features` of VISOR) replaced by
  one returning precomputed features. Everything else of the forward is timed: embedding, feature scatter,
  decoder layers, cross-attention, cache fill, lm_head on the last position (what `generate` computes).
- time to first token = vision encoder + LLM prefill.
- decode: 32 (--new-tokens) greedy steps from the prefill's cache, time per token.
- physical limit (budget 0's floor): the same language model on the N_t text tokens alone (dense Qwen2 with
  lm_head on the last position) plus the key/value projections of the N_v visual tokens at every
  cross-attention layer, timed as one region.
- memory: peak RSS growth over a prefill + decode (CPU, sampled every 2 ms in the warm-up run, after
  gc + malloc_trim) or `torch.cuda.max_memory_allocated` growth (GPU). KV cache: bytes the cache holds after
  prefill (`visor_hf.flops.cache_nbytes`) next to the analytical `kv_cache_bytes`.
- FLOPs from `visor_hf.flops.count_flops` (lm_head on the last position), speed-up = dense / VISOR LLM prefill
  time, and speed-up / FLOPs ratio (1.0 = the FLOPs saving fully turned into time).
Times are medians of --repeats runs after --warmup runs; each repeat runs every model once, round-robin, so
background load hits them alike. CPU uses time.perf_counter, CUDA uses CUDA events.

--compile: dense given the same help as VISOR. Both models' `forward` is compiled the same way,
`model.forward = torch.compile(model.forward, dynamic=True)`, and so is the physical limit; the vision encoder, the
same module for both, stays eager. Sizes are symbolic from the first call on, so a prompt of another length (another
N_v) reuses the graphs; VISOR's budget is a Python value, and a budget that changes which layers run compiles its own
graphs (graph breaks only at VISOR's host decisions: tests/test_compile_prefill.py). At each N_v every model first
runs one untimed prefill + decode that compiles what the shape needs (before the --warmup runs, so memory is sampled
after compiling); each row keeps the seconds of those two calls, compiling included (`compile_prefill_s`,
`compile_decode_s`), the graphs Dynamo compiled in them (`graphs_compiled`) and in the warm-up and timed runs after
them (`graphs_recompiled`, 0 when nothing recompiled). Decode timings go through the same compiled forward, on the
prefill's dynamic cache (a decode step compiled whole on a static cache, with CUDA graphs, is
`count_ops.py --compile`). Rows, files and the BENCHMARKS.md section are tagged "compiled" (`prefill_cuda-compiled`),
so a compiled run never overwrites the eager tables.

This script measures and writes the rows (`prefill_TAG.json` in --output-dir; a temporary folder with --smoke);
`report.py` derives ratios and writes the table, target verdicts, plots and the BENCHMARKS.md section, and can
redo that from the JSON alone. `--mixed-budgets` (one sample per budget, as one batch, against dense on the same batch
and the sum of the samples run alone) is described in `mixed_batch_rows.py`. Shapes, clock, memory sampler and the feature patch live in `common.py`.

Usage:
    python benchmarks/bench_prefill.py --smoke                                    # seconds, tiny shapes, temp folder
    python benchmarks/bench_prefill.py --tiny-vision --benchmarks-md BENCHMARKS.md  # CPU, real LLM shapes
    python benchmarks/bench_prefill.py --device cuda --dtype bfloat16 --attn sdpa --vision-tokens 729 1485 2916 7290 \\
        --benchmarks-md BENCHMARKS.md
    python benchmarks/bench_prefill.py --device cuda --language-model qwen2-7b --vision-tokens 2916 7290  # compute-bound
    python benchmarks/bench_prefill.py --device cuda --batch-size 8 --vision-tokens 2916                # throughput
    python benchmarks/bench_prefill.py --tiny-vision --mixed-budgets 0 0 0 0 2 2 4 8 --vision-tokens 1485  # mixed batch
    python benchmarks/bench_prefill.py --device cuda --compile --vision-tokens 2916 --budgets 0 2 4 8   # both compiled
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
import report
from common import Clock, PeakMemory
from visor_hf.flops import cache_nbytes, count_flops, default_num_crops, kv_cache_bytes

# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring for what each column measures.")
    common.add_model_arguments(parser)
    parser.add_argument("--vision-tokens", type=int, nargs="+", default=None,
                        help="N_v values; default 729 1485 2916 (CPU) or 729 1485 2916 7290 (CUDA)")
    parser.add_argument("--text-tokens", type=int, default=64, help="N_t: prompt tokens besides the image (default 64)")
    parser.add_argument("--budgets", nargs="+", default=None,
                        help="VISOR budgets (default 0 2 4 8 auto; 2 with --token-reduction); 'auto' runs only if the "
                             "model has a routing token")
    parser.add_argument("--token-reduction", nargs="+", default=None, choices=["visionzip", "vispruner", "pack"],
                        help="token-reduction mode instead: VISOR, VISOR + each method and dense + each pruning "
                             "method, also at matched FLOPs (benchmarks/token_reduction_rows.py)")
    parser.add_argument("--keep-ratio", type=float, default=0.25,
                        help="with --token-reduction: visual tokens kept, in (0, 1]; packing packs round(1/r) tokens")
    parser.add_argument("--image-sizes", nargs="+", default=None,
                        help="with --token-reduction: one image of each HEIGHTxWIDTH (default 384x384 768x768, "
                             "+ 1152x1152 on CUDA: 1,485, 3,699 and 7,371 visual tokens)")
    parser.add_argument("--mixed-budgets", nargs="+", default=None, metavar="BUDGET",
                        help="mixed-budget mode instead: one prompt per budget (e.g. 0 0 0 0 2 2 4 8) run as one batch "
                             "with budget=[...], against dense on the same batch and next to the sum of each sample "
                             "run alone (benchmarks/mixed_batch_rows.py)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="prompts run together (the same prompt repeated; default 1). On a GPU a larger batch "
                             "turns launch-bound timings into arithmetic-bound ones")
    parser.add_argument("--compile", action="store_true",
                        help="both models' forward compiled with torch.compile(dynamic=True), dense LLaVA-OV given the "
                             "same help; each model's first prefill + decode at each N_v compiles (untimed, before the "
                             "warm-up); decode goes through the same compiled forward; rows, files and the "
                             "BENCHMARKS.md section are tagged 'compiled'")
    parser.add_argument("--compile-backend", default="inductor",
                        help="with --compile: torch.compile's backend (default inductor); 'eager' or 'aot_eager' trace "
                             "with Dynamo but generate no kernels: a quick check of the compiled path (tagged "
                             "'compiled-BACKEND')")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model first (memory is sampled there)")
    parser.add_argument("--quiet-wait", type=float, default=3600.0,
                        help="CPU: seconds a run may wait in all for other processes to leave the CPU before its "
                             "timings (default 3600)")
    parser.add_argument("--retries", type=int, default=3,
                        help="CPU: times a timing is re-run when other processes took more than a quarter of a core "
                             "during it (default 3)")
    parser.add_argument("--output-dir", default=None,
                        help="rows (.json), table (.md) and plots (.png); default benchmarks/results, or a new "
                             "temporary folder with --smoke")
    parser.add_argument("--benchmarks-md", default=None,
                        help="also write the table into this markdown file, in this script's own section")
    args = common.finish_model_arguments(parser.parse_args(argv))
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be at least 1")
    if args.batch_size > 1 and args.token_reduction:
        parser.error("--batch-size applies without --token-reduction only (the reduction tables are per prompt)")
    if args.compile and (args.token_reduction or args.mixed_budgets is not None):
        parser.error("--compile applies to the prefill table only: not with --token-reduction or --mixed-budgets")
    if args.compile_backend != "inductor" and not args.compile:
        parser.error("--compile-backend applies with --compile only")
    if args.mixed_budgets is not None:
        check_mixed_args(parser, args)
    if args.smoke:
        args.vision_tokens = args.vision_tokens or [32, 64]
        args.text_tokens, args.new_tokens, args.repeats = 16, 4, 1
    args.vision_tokens = args.vision_tokens or ([729, 1485, 2916, 7290] if args.device == "cuda" else [729, 1485, 2916])
    args.budgets = args.budgets or ([] if args.mixed_budgets else ["2"] if args.token_reduction else ["0", "2", "4", "8", "auto"])
    if not args.token_reduction and (args.image_sizes or "--keep-ratio" in (argv if argv is not None else sys.argv)):
        parser.error("--image-sizes and --keep-ratio apply with --token-reduction only")
    if args.token_reduction:
        check_token_reduction_args(parser, args)
    return args


def check_mixed_args(parser, args) -> None:
    from mixed_batch_rows import parse_mixed_budgets

    if args.token_reduction or args.batch_size > 1 or args.budgets:
        parser.error("--mixed-budgets sets the batch (one sample per budget): not with --token-reduction, "
                     "--batch-size or --budgets")
    try:
        args.mixed_budgets = parse_mixed_budgets(args.mixed_budgets)
    except ValueError as error:
        parser.error(str(error))
    if len(args.mixed_budgets) < 2:
        parser.error(f"--mixed-budgets {args.mixed_budgets}: give at least two samples' budgets")
    args.batch_size = len(args.mixed_budgets)


def check_token_reduction_args(parser, args) -> None:
    from token_reduction_rows import parse_image_size

    if not 0 < args.keep_ratio <= 1:
        parser.error(f"--keep-ratio {args.keep_ratio}: must be in (0, 1]")
    if "auto" in args.budgets:
        parser.error("--budgets auto does not combine with --token-reduction (a grafted model has no trained "
                     "router); use fixed budgets")
    default_sizes = ["56x56", "112x112"] if args.smoke else ["384x384", "768x768"] + (["1152x1152"] if args.device == "cuda" else [])
    try:
        args.image_sizes = [parse_image_size(size) for size in args.image_sizes or default_sizes]
    except ValueError as error:
        parser.error(str(error))


def output_dir(args) -> Path:
    """--output-dir; by default benchmarks/results, but a smoke run never writes there (a fresh temporary folder)."""
    if args.output_dir is None:
        args.output_dir = tempfile.mkdtemp(prefix="visor_bench_smoke_") if args.smoke else "benchmarks/results"
    path = Path(args.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# The measured stages
# --------------------------------------------------------------------------------------------------


def physical_limit(llava, visor, text_ids: torch.Tensor, features: torch.Tensor) -> None:
    """Budget 0's floor: the language model on the text tokens alone, plus the cross-attention key/value
    projections of the visual tokens (what no VISOR configuration can skip)."""
    hidden = llava.model.language_model(input_ids=text_ids, use_cache=True).last_hidden_state
    llava.lm_head(hidden[:, -1:])
    visual = features.unsqueeze(0).expand(text_ids.shape[0], -1, -1)
    for cross in visor.model.cross_attn.values():
        cross.k_proj(visual), cross.v_proj(visual)


def compile_models(llava, visor, backend: str):
    """--compile: both models' forward compiled the same way, and the physical limit too; returns the latter."""
    # each budget that changes the layers is a configuration of its own: more than Dynamo's default 8 per code object
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # an error, not a frame run eagerly in a compiled table
    for model in (llava, visor):
        model.forward = torch.compile(model.forward, dynamic=True, backend=backend)  # nn.Module calls the attribute
    return torch.compile(physical_limit, dynamic=True, backend=backend)


@contextlib.contextmanager
def counting_graphs(args, row: dict, key: str):
    """--compile: adds the graphs Dynamo compiles inside the block to row[key] (without --compile: nothing)."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    yield
    if args.compile:
        row[key] = row.get(key, 0) + counters["stats"]["unique_graphs"] - before


def new_row(model: str, budget, num_visual: int, num_text: int, num_crops: int) -> dict:
    return {"model": model, "budget": budget, "num_visual": num_visual, "num_text": num_text, "num_crops": num_crops,
            "prefill_s": [], "decode_s": [], "vision_s": []}


def bench_size(args, llava, visor, budgets, num_visual: int, clock: Clock, generator,
               limit_fn=physical_limit) -> list[dict]:
    """Every model at one N_v; returns one row per model (dense, each budget, physical limit). `limit_fn`: the
    physical limit as run (compiled with --compile)."""
    config, device, dtype = visor.config, args.device, getattr(torch, args.dtype)
    crop = config.vision_config.image_size
    num_crops = default_num_crops(config, num_visual)
    batch = args.batch_size
    prompt = common.make_prompt(config, num_visual, args.text_tokens, config.routing_token_id, generator).to(device)
    num_text = int((prompt != config.image_token_id).sum())
    input_ids = prompt.expand(batch, -1).contiguous()
    text_ids = prompt[prompt != config.image_token_id].unsqueeze(0).expand(batch, -1).contiguous()
    features = (0.02 * torch.randn(num_visual, config.text_config.hidden_size, generator=generator)).to(device, dtype)
    pixel_values = torch.randn(num_crops * batch, 3, crop, crop, generator=generator).to(device, dtype)
    inputs = common.placeholder_inputs(input_ids, (crop, crop), device, dtype)

    entries = [("dense", llava, None)] + [(f"VISOR {b}", visor, b) for b in budgets]
    rows = {name: new_row(name, budget, num_visual, num_text, num_crops) for name, _, budget in entries}
    limit = new_row("physical limit", None, num_visual, num_text, num_crops)

    run_limit = lambda: limit_fn(llava, visor, text_ids, features)
    with torch.inference_mode(), common.precomputed_image_features(llava, visor, features, num_images=batch):
        if args.compile:
            for name, model, budget in entries:
                compile_run(args, rows[name], model, inputs, budget, clock)
            with counting_graphs(args, limit, "graphs_compiled"):
                _, limit["compile_prefill_s"] = clock(run_limit, retry=False)
        for repeat in range(args.warmup + args.repeats):
            timed = repeat >= args.warmup
            _, seconds = clock(lambda: common.vision_encoder(llava, pixel_values), retry=timed)
            if timed:
                for row in rows.values():
                    row["vision_s"].append(seconds)
            for name, model, budget in entries:
                with counting_graphs(args, rows[name], "graphs_recompiled"):
                    run_model(args, rows[name], model, inputs, budget, clock, first=repeat == 0, timed=timed)
            with counting_graphs(args, limit, "graphs_recompiled"):
                _, seconds = clock(run_limit, retry=timed)
            if timed:
                limit["prefill_s"].append(seconds)
    return finish_rows(args, config, list(rows.values()), limit)


def compile_run(args, row: dict, model, inputs: dict, budget, clock: Clock) -> None:
    """--compile: one untimed prefill + decode, which compiles what this shape needs (nothing at a later N_v when the
    sizes stayed symbolic); the row keeps both calls' seconds, compiling included, and the graphs compiled."""
    with counting_graphs(args, row, "graphs_compiled"):
        (token, cache, _), row["compile_prefill_s"] = clock(lambda: common.prefill(model, inputs, budget), retry=False)
        _, row["compile_decode_s"] = clock(lambda: common.decode(model, token, cache, args.new_tokens), retry=False)


def run_model(args, row: dict, model, inputs: dict, budget, clock: Clock, first: bool, timed: bool) -> None:
    """One prefill + decode of one model into its row; memory and cache bytes in the first (warm-up) run only, so
    that the sampler never runs beside a timing."""
    with PeakMemory(args.device) if first else contextlib.nullcontext() as memory:
        (token, cache, layers), prefill_s = clock(lambda: common.prefill(model, inputs, budget), retry=timed)
        kv_bytes = cache_nbytes(cache)["total"]  # after prefill, before decoding grows it
        if timed:  # decoding grows the cache in place: each attempt starts from a copy of it
            _, decode_s = clock(lambda c: common.decode(model, token, c, args.new_tokens), setup=lambda: copy.deepcopy(cache))
        else:
            _, decode_s = clock(lambda: common.decode(model, token, cache, args.new_tokens), retry=False)
    if first:
        row["peak_memory"], row["kv_bytes"] = memory.peak_growth, kv_bytes
        row["self_attn_layers"] = list(layers[0]) if layers else None
        row["next_token"] = token[:, 0].tolist()  # each prompt's greedy token after prefill (compiled vs eager)
    if timed:
        row["prefill_s"].append(prefill_s)
        row["decode_s"].append(decode_s / max(1, args.new_tokens))


def finish_rows(args, config, rows: list[dict], limit: dict) -> list[dict]:
    """Medians, the FLOPs of what each row ran and its analytical KV bound, for the whole batch."""
    median = lambda xs: statistics.median(xs) if xs else float("nan")
    dense = rows[0]
    for row in rows + [limit]:
        for key in ("prefill_s", "decode_s", "vision_s"):
            row[key + "_all"] = row[key]
            row[key] = median(row[key])
        row["new_tokens"] = args.new_tokens
    for row in rows:
        budget = "full" if row["budget"] is None else row["budget"]
        if row["budget"] == "auto":  # what the router chose, counted with the router's own cost
            budget = tuple(row["self_attn_layers"])
        flops = count_flops(config, row["num_visual"], row["num_text"], budget, num_crops=row["num_crops"],
                            router=row["budget"] == "auto")
        entry = flops["dense" if row is dense else "visor"]  # per prompt; the batch runs args.batch_size of them
        row["flops_llm"], row["flops_vision"] = entry["llm"] * args.batch_size, entry["vision_encoder"] * args.batch_size
        kv = kv_cache_bytes(config, row["num_visual"], row["num_text"], budget, dtype=args.dtype)
        row["kv_bound"] = kv["dense" if row is dense else "visor"]["total"] * args.batch_size
        row["self_attn_layers"] = list(flops["self_attn_layers"]) if row is not dense else list(range(config.num_layers))
    # the physical limit: budget 0 without the text side of the cross-attention layers (their K/V of V stay)
    zero = count_flops(config, limit["num_visual"], limit["num_text"], 0)["visor"]
    parts = zero["breakdown"]
    limit["flops_llm"] = (zero["llm"] - parts["cross_text_proj"] - parts["cross_scores"] - parts["cpe"]) * args.batch_size
    limit["flops_vision"] = zero["vision_encoder"] * args.batch_size
    return rows + [limit]


# --------------------------------------------------------------------------------------------------


def describe_run(args, kind: str, visor, clock: Clock, command: str, rows: list[dict]) -> dict:
    """A run as `report.py` reads it: what ran where, and its rows."""
    tag = common.run_tag(args)
    device = args.device.upper() + (", smoke" if args.smoke else "")
    if kind == "mixed_batch":
        budgets = " ".join(map(str, args.mixed_budgets))
        title, section = f"Mixed-budget batch: VISOR [{budgets}] vs dense LLaVA-OV on the same batch ({device})", f"mixed-{tag}"
    elif kind == "prefill":
        name = common.LANGUAGE_MODELS[args.language_model][0]
        backend = "" if args.compile_backend == "inductor" else f", backend {args.compile_backend}"
        compiled = f", both compiled (torch.compile, dynamic shapes{backend})" if args.compile else ""
        title = (f"Prefill and decode{compiled}: VISOR vs dense LLaVA-OV ({device}"
                 f"{', ' + name if args.language_model != common.DEFAULT_LANGUAGE_MODEL else ''}"
                 f"{f', batch {args.batch_size}' if args.batch_size > 1 else ''})")
        section = tag
    else:
        title, section = f"Token reduction with VISOR and with dense LLaVA-OV ({device})", f"token-reduction-{tag}"
    return {
        "kind": kind, "tag": tag, "section": section, "title": title, "command": command,
        "machine": common.environment(args), "code": args.code, "shapes": common.shapes_text(args),
        "settings": {key: getattr(args, key) for key in ("text_tokens", "batch_size", "repeats", "warmup", "new_tokens")},
        "num_layers": visor.config.num_layers, "num_cross": len(visor.config.cross_attn_layers),
        "clock": clock.summary(), "args": vars(args), "rows": rows,
    }


def measure_prefill(args, llava, visor, budgets, clock: Clock, generator) -> list[dict]:
    limit_fn = compile_models(llava, visor, args.compile_backend) if args.compile else physical_limit
    rows = []
    for num_visual in args.vision_tokens:
        start = time.perf_counter()
        size_rows = bench_size(args, llava, visor, budgets, num_visual, clock, generator, limit_fn)
        rows.extend(size_rows)
        print(f"N_v={num_visual} done in {time.perf_counter() - start:.0f}s", flush=True)
        if args.compile:
            print(compile_summary(size_rows), flush=True)
        print(report.prefill_table(size_rows), flush=True)
    return rows


def compile_summary(rows: list[dict]) -> str:
    """--compile: each row's first prefill and decode at this N_v (compiling included) and the graphs compiled."""
    lines = ["compiling (each model's first prefill and decode at this N_v, compiling included):"]
    for row in rows:
        decode = f", decode {row['compile_decode_s']:.1f} s" if "compile_decode_s" in row else ""
        lines.append(f"  {row['model']}: prefill {row['compile_prefill_s']:.1f} s{decode}; {row['graphs_compiled']} "
                     f"graphs compiled, {row['graphs_recompiled']} in the runs after")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.code = common.code_version()  # at start: the modeling file may change while a long run goes on
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else " ".join(argv)
    folder = output_dir(args)
    print(f"building models ({'smoke' if args.smoke else 'real'} shapes) ...", flush=True)
    start = time.perf_counter()
    llava, visor = common.build_models(args)
    print(f"built in {time.perf_counter() - start:.1f}s; {common.environment(args)}", flush=True)
    budgets = common.parse_budgets(args.budgets, visor)
    clock = Clock(args.device, retries=0, max_wait=0) if args.smoke else Clock(args.device, retries=args.retries, max_wait=args.quiet_wait)  # smoke: timings not taken seriously
    generator = torch.Generator().manual_seed(args.seed)

    if args.token_reduction:
        import token_reduction_rows

        kind, rows = "token_reduction", token_reduction_rows.run(args, llava, visor, budgets, clock, generator)
    elif args.mixed_budgets:
        import mixed_batch_rows

        kind, rows = "mixed_batch", mixed_batch_rows.run(args, llava, visor, args.mixed_budgets, clock, generator, run_model)
    else:
        kind, rows = "prefill", measure_prefill(args, llava, visor, budgets, clock, generator)
    run = describe_run(args, kind, visor, clock, command, rows)
    common.write_json(folder / f"{kind}_{run['tag']}.json", run)
    text = report.write(run, folder, args.benchmarks_md)
    print("\n" + text)
    print(f"rows, table and plots in {folder}")
    if args.benchmarks_md:
        print(f"updated {args.benchmarks_md}")
    return rows


if __name__ == "__main__":
    main()
