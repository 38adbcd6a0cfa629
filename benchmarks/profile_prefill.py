#!/usr/bin/env python
"""Where the time of one VISOR (or dense) prefill and of a few decode steps goes: torch.profiler tables.

Builds the same models as bench_prefill.py (same flags for shapes), runs one untimed warm-up, then profiles a
prefill and `--decode-steps` decode steps, and prints the top entries by self time: aten operators, and (Python
tracing) the functions that call them, e.g. `modeling_visor.py(151): forward` with its inclusive "CPU total".

Usage:
    python benchmarks/profile_prefill.py --tiny-vision --vision-tokens 1485 --budget 2
    python benchmarks/profile_prefill.py --tiny-vision --vision-tokens 1485 --budget dense
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_prefill as bench  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="0", help="a VISOR budget, or 'dense' for LLaVA-OV")
    parser.add_argument("--vision-tokens", type=int, default=1485)
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--no-python", action="store_true", help="operators only, no Python function rows")
    known, rest = parser.parse_known_args(argv)
    args = bench.parse_args(rest + ["--vision-tokens", str(known.vision_tokens)])
    if args.threads:  # --threads 1 gives stable tables on a busy machine
        torch.set_num_threads(args.threads)
    llava, visor = bench.build_models(args)
    model, budget = (llava, None) if known.budget == "dense" else (visor, bench.parse_budgets([known.budget], visor)[0])
    config, generator = visor.config, torch.Generator().manual_seed(args.seed)
    input_ids = bench.make_prompt(config, known.vision_tokens, args.text_tokens, config.routing_token_id, generator)
    features = 0.02 * torch.randn(known.vision_tokens, config.text_config.hidden_size, generator=generator)
    features = features.to(args.device, getattr(torch, args.dtype))
    crop = config.vision_config.image_size
    inputs = {"input_ids": input_ids.to(args.device), "attention_mask": torch.ones_like(input_ids).to(args.device),
              "pixel_values": torch.zeros(1, 1, 3, 1, 1, device=args.device, dtype=features.dtype),
              "image_sizes": torch.tensor([[crop, crop]], device=args.device)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    with torch.inference_mode(), bench.precomputed_image_features(llava, visor, features):
        token, cache, _ = bench.prefill(model, inputs, budget)  # warm-up
        bench.decode(model, token, cache, 2)
        for stage in ("prefill", "decode"):
            with profile(activities=activities, with_stack=not known.no_python, record_shapes=False) as prof:
                if stage == "prefill":
                    token, cache, _ = bench.prefill(model, inputs, budget)
                else:
                    bench.decode(model, token, cache, known.decode_steps)
            print(f"\n===== {stage} ({known.budget}, N_v={known.vision_tokens}) =====")
            print(prof.key_averages().table(sort_by=sort, row_limit=known.rows))


if __name__ == "__main__":
    main()
