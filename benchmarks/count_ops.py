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

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_prefill as bench  # noqa: E402


def top_level_ops(fn) -> Counter:
    """Top-level aten calls of fn(), except `aten::to` calls that return their input (already on the device and
    dtype asked for: no copy, no kernel)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(
        e.name for e in prof.events()
        if e.name.startswith("aten::") and e.cpu_parent is None and not (e.name == "aten::to" and not e.cpu_children)
    )


def main(argv=None) -> list[dict]:
    args = bench.parse_args(argv)
    llava, visor = bench.build_models(args)
    config, generator = visor.config, torch.Generator().manual_seed(args.seed)
    num_visual = args.vision_tokens[0]
    input_ids = bench.make_prompt(config, num_visual, args.text_tokens, None, generator)
    features = 0.02 * torch.randn(num_visual, config.text_config.hidden_size, generator=generator)
    crop = config.vision_config.image_size
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": torch.zeros(1, 1, 3, 1, 1), "image_sizes": torch.tensor([[crop, crop]])}
    entries = [("dense", llava, None)] + [(f"VISOR {b}", visor, b) for b in bench.parse_budgets(args.budgets, visor)]
    rows = []
    with torch.inference_mode(), bench.precomputed_image_features(llava, visor, features):
        for name, model, budget in entries:
            bench.prefill(model, inputs, budget)  # warm-up
            prefill_ops = top_level_ops(lambda: bench.prefill(model, inputs, budget))
            token, cache, _ = bench.prefill(model, inputs, budget)
            decode_ops = top_level_ops(lambda: bench.decode(model, token, cache, 1))
            rows.append({"model": name, "prefill": sum(prefill_ops.values()), "decode": sum(decode_ops.values()),
                         "decode_ops": decode_ops, "decode_top": decode_ops.most_common(4)})
    dense = rows[0]
    print(f"N_v = {num_visual}, N_t = {args.text_tokens}, {config.num_layers} layers, "
          f"{len(config.cross_attn_layers)} cross-attention layers\n")
    print("| model | ops a prefill | vs dense | ops a decode step | vs dense | most called in a decode step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        top = ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in row["decode_top"])
        print(f"| {row['model']} | {row['prefill']:,} | {row['prefill'] / dense['prefill']:.2f}x | {row['decode']:,} | "
              f"{row['decode'] / dense['decode']:.2f}x | {top} |")
    return rows


if __name__ == "__main__":
    main()
