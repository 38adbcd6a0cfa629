#!/usr/bin/env python
"""Operator calls per prefill and per decode step, dense LLaVA-OV against VISOR budgets; with --compile, the kernels
of one decode step compiled whole, and its time.

On a GPU at batch 1 a small model is bound by kernel launches, not arithmetic (BENCHMARKS.md, "On the GPU"): its
time follows the number of operators Python dispatches. This counts them on the CPU with torch.profiler (top-level
`aten::` calls, the ones Python issues; `.to()` calls that change nothing are left out), so the launch overhead of a
change can be compared without a GPU.
The count does not depend on the sizes; `--smoke` shapes (24 layers, as Qwen2-0.5B) keep it fast.

`--compile`: dense given the same help as VISOR. Each model prefills (eagerly) into its own static cache, then one
decode step is compiled whole, `torch.compile(step, fullgraph=True)` (a graph break is an error):
- dense: transformers' `StaticCache(config=text_config, max_cache_len=L)`, and the step
  `llava(input_ids=token, use_cache=True, logits_to_keep=1, <cache>=cache)` (4.57 also gets `cache_position`, a
  tensor; 5.x keeps the position in the cache);
- VISOR: `VisorCache(max_cache_len=L)`, and the step `visor(input_ids=token, attention_mask=ones_like(token),
  use_cache=True, logits_to_keep=1, <cache>=cache)` (the pattern of tests/test_static_cache.py).
What is counted (CPU): the kernels one compiled step launches, i.e. the direct children of the compiled graph's call
(the profiler event "## Call CompiledFxGraph ... ##") in a torch.profiler trace of one step after three warm-up steps:
each is either a C++ kernel Inductor generated (a fused loop; recorded by name through
`torch._inductor.config.cpp.enable_kernel_profile`) or an extern operator the graph calls (`aten::mm`, `aten::addmm`,
SDPA, ...). Their own children (views, allocations inside an extern op) are not counted; neither is what runs around
the graph (Dynamo's guard check, the runtime wrapper). On CUDA the count is the device kernels (and copies/memsets)
the profiler sees in one step of the timed mode. The table also gives the graphs compiled and the graph breaks
(torch._dynamo counters; fullgraph makes a break an error), CUDA graph skips on CUDA, and the median time of a step
over `--repeats` runs of `--decode-steps` steps (`--compile-mode`: none on CPU, "reduce-overhead", i.e. CUDA
graphs, on CUDA). Inductor's CPU fusion is not its CUDA fusion, so the CPU count is a proxy of the GPU's, the same
for both models.

Usage:
    python benchmarks/count_ops.py --smoke
    python benchmarks/count_ops.py --smoke --budgets 0 2 8 --vision-tokens 200
    python benchmarks/count_ops.py --smoke --compile --budgets 0 2 8              # compiled decode steps, CPU
    python benchmarks/count_ops.py --device cuda --compile --vision-tokens 2916   # real 0.5B shapes, CUDA graphs
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import common


def top_level_ops(fn) -> Counter:
    """Top-level aten calls of fn(), except `aten::to` calls that return their input (already on the device and
    dtype asked for: no copy, no kernel)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(
        e.name for e in prof.events()
        if e.name.startswith("aten::") and e.cpu_parent is None and not (e.name == "aten::to" and not e.cpu_children)
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_arguments(parser)
    parser.add_argument("--vision-tokens", type=int, nargs="+", default=[32],
                        help="N_v (the first value is used; the count does not depend on it; default 32)")
    parser.add_argument("--text-tokens", type=int, default=16, help="N_t (default 16)")
    parser.add_argument("--budgets", nargs="+", default=["0", "2", "4", "8"], help="VISOR budgets (default 0 2 4 8)")
    parser.add_argument("--compile", action="store_true",
                        help="count the kernels of one decode step compiled whole with a static cache, and time it "
                             "(see the module docstring)")
    parser.add_argument("--compile-mode", default=None,
                        help="with --compile: torch.compile mode (default: none on CPU, reduce-overhead on CUDA)")
    parser.add_argument("--decode-steps", type=int, default=16, help="with --compile: steps a timed run (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="with --compile: timed runs, median (default 3)")
    args = common.finish_model_arguments(parser.parse_args(argv))
    if args.compile and args.compile_mode is None and args.device == "cuda":
        args.compile_mode = "reduce-overhead"
    return args


def count_model(model, inputs: dict, budget) -> dict:
    """Operators of one prefill and of one decode step after it (after a warm-up prefill)."""
    common.prefill(model, inputs, budget)  # warm-up
    prefill_ops = top_level_ops(lambda: common.prefill(model, inputs, budget))
    token, cache, _ = common.prefill(model, inputs, budget)
    decode_ops = top_level_ops(lambda: common.decode(model, token, cache, 1))
    return {"prefill": sum(prefill_ops.values()), "decode": sum(decode_ops.values()), "decode_ops": decode_ops,
            "decode_top": decode_ops.most_common(4)}


def print_table(rows: list[dict], num_visual: int, args, config) -> None:
    dense = rows[0]
    print(f"N_v = {num_visual}, N_t = {args.text_tokens}, {config.num_layers} layers, "
          f"{len(config.cross_attn_layers)} cross-attention layers\n")
    print("| model | ops a prefill | vs dense | ops a decode step | vs dense | most called in a decode step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        top = ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in row["decode_top"])
        print(f"| {row['model']} | {row['prefill']:,} | {row['prefill'] / dense['prefill']:.2f}x | {row['decode']:,} | "
              f"{row['decode'] / dense['decode']:.2f}x | {top} |")


# --------------------------------------------------------------------------------------------------
# --compile: one decode step compiled whole, static caches
# --------------------------------------------------------------------------------------------------


def graph_kernels(prof) -> Counter:
    """CPU: the direct children of each compiled graph's call (Inductor's C++ kernels, by the name
    `graph_N_cpp_fused_...`, counted as "cpp kernel", and the extern aten operators). CUDA: device-side events."""
    events = prof.events()
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    if device:
        return Counter("cuda kernel" for e in device)
    calls = [e for e in events if e.name.startswith("## Call CompiledFxGraph")]
    return Counter("cpp kernel" if "_cpp_fused" in k.name else k.name for call in calls for k in call.cpu_children)


def static_step(model, inputs: dict, budget, max_cache_len: int):
    """Prefill `inputs` into a fresh static cache; returns (step(token, position) -> logits, first token)."""
    from transformers import StaticCache

    from visor_hf.configuration_visor import TRANSFORMERS_V5
    from visor_hf.modeling_visor import VisorCache

    prompt_length = inputs["input_ids"].shape[1]
    if budget is None:  # dense: transformers' own static cache
        cache = StaticCache(config=model.config.get_text_config(), max_cache_len=max_cache_len)
        position = {} if TRANSFORMERS_V5 else {"cache_position": torch.arange(prompt_length, device=common_device(inputs))}
        out = model(**inputs, use_cache=True, logits_to_keep=1, **{common.CACHE_KW: cache}, **position)

        def step(token, position):
            extra = {} if TRANSFORMERS_V5 else {"cache_position": position}
            return model(input_ids=token, use_cache=True, logits_to_keep=1, **{common.CACHE_KW: cache}, **extra).logits
    else:
        cache = VisorCache(max_cache_len=max_cache_len)
        out = model(**inputs, budget=budget, use_cache=True, logits_to_keep=1, **{common.CACHE_KW: cache})

        def step(token, position):  # the position lives in the cache
            return model(input_ids=token, attention_mask=torch.ones_like(token), use_cache=True, logits_to_keep=1,
                         **{common.CACHE_KW: cache}).logits
    return step, out.logits[:, -1:].argmax(-1)


def common_device(inputs: dict):
    return inputs["input_ids"].device


def compiled_decode(args, model, inputs: dict, budget, clock) -> dict:
    """Compile one model's decode step, count the kernels of one step, time --repeats x --decode-steps steps."""
    from torch._dynamo.utils import counters

    warmup = 3
    prompt_length = inputs["input_ids"].shape[1]
    max_cache_len = prompt_length + warmup + 1 + args.repeats * args.decode_steps + 1
    torch._dynamo.reset()
    counters.clear()
    step, token = static_step(model, inputs, budget, max_cache_len)
    compiled = torch.compile(step, fullgraph=True, mode=args.compile_mode)
    position = torch.tensor([prompt_length], device=token.device)

    def run(steps: int):
        nonlocal token, position
        for _ in range(steps):
            token = compiled(token, position)[:, -1:].argmax(-1)
            position = position + 1
        return token

    run(warmup)  # compiles (and records the CUDA graph)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        run(1)
        if args.device == "cuda":
            torch.cuda.synchronize()
    kernels = graph_kernels(prof)
    seconds = [clock(lambda: run(args.decode_steps))[1] / args.decode_steps for _ in range(args.repeats)]
    return {"kernels": sum(kernels.values()), "kernel_kinds": kernels, "step_s": statistics.median(seconds),
            "graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def print_compiled_table(rows: list[dict], num_visual: int, args, config) -> None:
    dense = rows[0]
    print(f"Compiled decode step (static cache, torch.compile(fullgraph=True, mode={args.compile_mode!r})), "
          f"N_v = {num_visual}, N_t = {args.text_tokens}, batch 1, {config.num_layers} layers, "
          f"{len(config.cross_attn_layers)} cross-attention layers, {args.device}, {args.dtype}\n")
    print("| model | kernels a decode step | vs dense | of which extern ops | graphs | graph breaks | CUDA graph skips "
          "| ms a step | vs dense |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        kinds = row["kernel_kinds"]
        extern = sum(n for name, n in kinds.items() if name.startswith("aten::"))
        print(f"| {row['model']} | {row['kernels']:,} | {row['kernels'] / dense['kernels']:.2f}x | {extern} "
              f"| {row['graphs']} | {row['breaks']} | {row['cudagraph_skips']} | {row['step_s'] * 1000:,.2f} "
              f"| {row['step_s'] / dense['step_s']:.2f}x |")
    worst = max(rows[1:], key=lambda r: r["kernels"])
    print(f"\ntarget: VISOR's compiled decode step launches no more kernels than dense's: "
          f"{'met' if worst['kernels'] <= dense['kernels'] else 'MISSED'} (most: {worst['model']}, "
          f"{worst['kernels'] / dense['kernels']:.2f}x)")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile and args.device == "cpu":
        from torch._inductor import config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # each C++ kernel is a profiler event
    llava, visor = common.build_models(args)
    config, generator = visor.config, torch.Generator().manual_seed(args.seed)
    num_visual, crop = args.vision_tokens[0], config.vision_config.image_size
    input_ids = common.make_prompt(config, num_visual, args.text_tokens, None, generator)
    features = (0.02 * torch.randn(num_visual, config.text_config.hidden_size, generator=generator)).to(
        args.device, getattr(torch, args.dtype))
    inputs = common.placeholder_inputs(input_ids, (crop, crop), args.device, features.dtype)
    entries = [("dense", llava, None)] + [(f"VISOR {b}", visor, b) for b in common.parse_budgets(args.budgets, visor)]
    if args.compile:
        clock = common.Clock(args.device, retries=0, max_wait=30)  # no re-runs: the static caches hold a fixed number of steps
        with torch.no_grad(), common.precomputed_image_features(llava, visor, features):
            rows = [{"model": name, **compiled_decode(args, model, inputs, budget, clock)} for name, model, budget in entries]
        print_compiled_table(rows, num_visual, args, config)
        return rows
    with torch.inference_mode(), common.precomputed_image_features(llava, visor, features):
        rows = [{"model": name, **count_model(model, inputs, budget)} for name, model, budget in entries]
    print_table(rows, num_visual, args, config)
    return rows


if __name__ == "__main__":
    main()
