"""Rows of the mixed-budget batch mode of `bench_prefill.py` (`--mixed-budgets 0 0 0 0 2 2 4 8`).

A served batch mixes budgets (the router picks one per question). VISOR runs each sample for what it chose (at a
layer, the samples that run it on [V; T] form one sub-batch, the others another), so a mixed batch should cost the sum
of its samples' FLOPs and should run about as fast as that sum allows. This mode measures it at one prompt shape
(one image of N_v visual tokens, N_t text tokens), the same prompt for every sample:

- "batch" rows: the B samples run together as one batch: dense LLaVA-OV (every sample dense) and VISOR with
  `budget=[b_1, ..., b_B]`.
- "single" rows: one sample at a time (batch 1): dense, and VISOR at each distinct budget of the list.
- "sum of singles" rows: what running the B samples one after the other costs: B x dense's single row, and the sum
  over the list of VISOR's single rows (sums of the medians), for prefill seconds, decode seconds a step, KV bytes.

Each row holds median seconds (prefill: `model(..., use_cache=True, logits_to_keep=1)` with precomputed image
features, as in the rest of `bench_prefill.py`; decode: `--new-tokens` greedy steps from the prefill's dynamic cache,
per step), the LLM FLOPs of what it ran (`visor_hf.flops.count_flops` per sample, summed over the batch's samples:
dense's B x its own, VISOR's the sum over the budgets) and the KV bytes after prefill (`cache_nbytes`) next to the
analytical `kv_cache_bytes` summed the same way. `report.py` derives the FLOPs ratio (dense's FLOPs over the row's,
within a group), the speed-up (dense's time over the row's, within a group), throughput (samples/s and prompt
tokens/s of the prefill, generated tokens/s of decoding) and the target: the batch's speed-up >= 0.8 x its FLOPs ratio.
"""

from __future__ import annotations

import statistics

import torch

import common
from visor_hf.flops import count_flops, default_num_crops, kv_cache_bytes


def parse_mixed_budgets(names: list[str]) -> list:
    """Fixed budgets only ('auto' needs a trained router; 'full' and ints are fixed)."""
    budgets = []
    for name in names:
        if name == "auto":
            raise ValueError("--mixed-budgets: 'auto' needs a trained router; give fixed budgets (ints or 'full')")
        budgets.append(int(name) if name.lstrip("-").isdigit() else name)
    return budgets


def distinct(budgets: list) -> list:
    """The distinct budgets of the list, in their first order."""
    return list(dict.fromkeys(budgets))


def run(args, llava, visor, budgets: list, clock, generator, run_model) -> list[dict]:
    """Every N_v of args.vision_tokens: the batch, single and sum-of-singles rows."""
    rows = []
    for num_visual in args.vision_tokens:
        size_rows = bench_mixed(args, llava, visor, budgets, num_visual, clock, generator, run_model)
        rows.extend(size_rows)
        print(f"N_v={num_visual} done", flush=True)
    return rows


def bench_mixed(args, llava, visor, budgets: list, num_visual: int, clock, generator, run_model) -> list[dict]:
    """One N_v. Each repeat runs every entry once, round-robin (batched and single alike), so background load on a
    shared machine hits them alike."""
    config, device, dtype = visor.config, args.device, getattr(torch, args.dtype)
    crop = config.vision_config.image_size
    num_crops = default_num_crops(config, num_visual)
    prompt = common.make_prompt(config, num_visual, args.text_tokens, config.routing_token_id, generator).to(device)
    num_text = int((prompt != config.image_token_id).sum())
    features = (0.02 * torch.randn(num_visual, config.text_config.hidden_size, generator=generator)).to(device, dtype)
    size = len(budgets)
    batched = common.placeholder_inputs(prompt.expand(size, -1).contiguous(), (crop, crop), device, dtype)
    single = common.placeholder_inputs(prompt, (crop, crop), device, dtype)

    # (row, model, budget, inputs, number of images in the inputs)
    entries = [(new_row("dense", "batch", None, size), llava, None, batched, size),
               (new_row("VISOR mixed", "batch", budgets, size), visor, budgets, batched, size),
               (new_row("dense", "single", None, 1), llava, None, single, 1)]
    entries += [(new_row(f"VISOR {b}", "single", [b], 1), visor, b, single, 1) for b in distinct(budgets)]
    for row, *_ in entries:
        row.update(num_visual=num_visual, num_text=num_text, num_crops=num_crops)
    with torch.inference_mode():
        for repeat in range(args.warmup + args.repeats):
            for row, model, budget, inputs, images in entries:
                with common.precomputed_image_features(llava, visor, features, num_images=images):
                    run_model(args, row, model, inputs, budget, clock, first=repeat == 0, timed=repeat >= args.warmup)
    rows = [row for row, *_ in entries]
    for row in rows:
        finish_row(args, config, row)
    return rows + sums_of_singles(rows, budgets)


def new_row(model: str, group: str, budgets, samples: int) -> dict:
    return {"model": model, "group": group, "budgets": budgets, "samples": samples, "prefill_s": [], "decode_s": [],
            "vision_s": []}


def sample_counts(config, row: dict, budget, dtype: str) -> tuple[float, int]:
    """(LLM FLOPs, analytical KV bytes in `dtype`) of one sample of the row at `budget` (None: dense)."""
    kind = "dense" if budget is None else "visor"
    budget = "full" if budget is None else budget
    flops = count_flops(config, row["num_visual"], row["num_text"], budget, num_crops=row["num_crops"])[kind]["llm"]
    kv = kv_cache_bytes(config, row["num_visual"], row["num_text"], budget, dtype=dtype)[kind]["total"]
    return flops, kv


def finish_row(args, config, row: dict) -> None:
    """Medians, and the FLOPs and analytical KV bytes summed over the row's samples."""
    for key in ("prefill_s", "decode_s"):
        row[key + "_all"] = row[key]
        row[key] = statistics.median(row[key]) if row[key] else float("nan")
    del row["vision_s"]  # the vision tower is not run in this mode (features are precomputed)
    per_sample = [None] * row["samples"] if row["budgets"] is None else row["budgets"]
    counts = [sample_counts(config, row, b, args.dtype) for b in per_sample]
    row["flops_llm"] = sum(flops for flops, _ in counts)
    row["kv_bound"] = sum(kv for _, kv in counts)
    row["new_tokens"] = args.new_tokens


def sums_of_singles(rows: list[dict], budgets: list) -> list[dict]:
    """The B samples run one after the other: dense's single row B times, VISOR's single rows over the list."""
    singles = {r["model"]: r for r in rows if r["group"] == "single"}
    size, sums = len(budgets), []
    for model, parts in [("dense", [singles["dense"]] * size),
                         ("VISOR mixed", [singles[f"VISOR {b}"] for b in budgets])]:
        row = {key: parts[0][key] for key in ("num_visual", "num_text", "num_crops", "new_tokens")}
        row.update(model=model, group="sum of singles", samples=size, budgets=None if model == "dense" else budgets)
        for key in ("prefill_s", "decode_s", "flops_llm", "kv_bytes", "kv_bound"):
            row[key] = sum(part[key] for part in parts)
        sums.append(row)
    return sums
