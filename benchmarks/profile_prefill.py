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

import torch
from torch.profiler import ProfilerActivity, profile

import common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_arguments(parser)
    parser.add_argument("--budget", default="0", help="a VISOR budget, or 'dense' for LLaVA-OV")
    parser.add_argument("--vision-tokens", type=int, default=1485)
    parser.add_argument("--text-tokens", type=int, default=64, help="N_t: prompt tokens besides the image (default 64)")
    parser.add_argument("--decode-steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--no-python", action="store_true", help="operators only, no Python function rows")
    return common.finish_model_arguments(parser.parse_args(argv))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:  # --threads 1 gives stable tables on a busy machine
        torch.set_num_threads(args.threads)
    llava, visor = common.build_models(args)
    model, budget = (llava, None) if args.budget == "dense" else (visor, common.parse_budgets([args.budget], visor)[0])
    config, generator = visor.config, torch.Generator().manual_seed(args.seed)
    input_ids = common.make_prompt(config, args.vision_tokens, args.text_tokens, config.routing_token_id, generator)
    features = 0.02 * torch.randn(args.vision_tokens, config.text_config.hidden_size, generator=generator)
    features = features.to(args.device, getattr(torch, args.dtype))
    crop = config.vision_config.image_size
    inputs = common.placeholder_inputs(input_ids, (crop, crop), args.device, features.dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    with torch.inference_mode(), common.precomputed_image_features(llava, visor, features):
        token, cache, _ = common.prefill(model, inputs, budget)  # warm-up
        common.decode(model, token, cache, 2)
        for stage in ("prefill", "decode"):
            with profile(activities=activities, with_stack=not args.no_python, record_shapes=False) as prof:
                if stage == "prefill":
                    token, cache, _ = common.prefill(model, inputs, budget)
                else:
                    common.decode(model, token, cache, args.decode_steps)
            print(f"\n===== {stage} ({args.budget}, N_v={args.vision_tokens}) =====")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
