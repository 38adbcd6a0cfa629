#!/usr/bin/env python
"""Operator calls per prefill and per decode step, dense LLaVA-OV against VISOR budgets.

On a GPU at batch 1 a small model is bound by kernel launches, not arithmetic (BENCHMARKS.md, "On the GPU"): its
time follows the number of operators Python dispatches. This counts them on the CPU with torch.profiler (top-level
`aten::` calls, the ones Python issues; `.to()` calls that change nothing are left out), so the launch overhead of a
change can be compared without a GPU.
The count does not depend on the sizes; `--smoke` shapes (24 layers, as Qwen2-0.5B) keep it fast.

Usage:
    python benchmarks/count_ops.py --smoke
    python benchmarks/count_ops.py --smoke --budgets 0 2 8 --vision-tokens 200
"""

from __future__ import annotations

import argparse
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
    return common.finish_model_arguments(parser.parse_args(argv))


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


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    llava, visor = common.build_models(args)
    config, generator = visor.config, torch.Generator().manual_seed(args.seed)
    num_visual, crop = args.vision_tokens[0], config.vision_config.image_size
    input_ids = common.make_prompt(config, num_visual, args.text_tokens, None, generator)
    features = (0.02 * torch.randn(num_visual, config.text_config.hidden_size, generator=generator)).to(
        args.device, getattr(torch, args.dtype))
    inputs = common.placeholder_inputs(input_ids, (crop, crop), args.device, features.dtype)
    entries = [("dense", llava, None)] + [(f"VISOR {b}", visor, b) for b in common.parse_budgets(args.budgets, visor)]
    with torch.inference_mode(), common.precomputed_image_features(llava, visor, features):
        rows = [{"model": name, **count_model(model, inputs, budget)} for name, model, budget in entries]
    print_table(rows, num_visual, args, config)
    return rows


if __name__ == "__main__":
    main()
