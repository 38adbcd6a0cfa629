"""The token-reduction mode of bench_prefill.py (`--token-reduction ... --keep-ratio r`): VISOR, VISOR + each
reduction and dense LLaVA-OV + each reduction, side by side and at matched FLOPs.

Rows, for each image size (`--image-sizes`; 384x384 gives 1,485 visual tokens, 768x768 gives 3,699):

    dense                        transformers' LlavaOnevisionForConditionalGeneration
    dense + m @ r                `visor_hf.baselines.TokenReducedLlavaOnevision`, each pruning method m
    VISOR b                      each budget b of --budgets (default 2)
    VISOR b + m @ r              each method m, VISOR-TR packing included (a packing layer of factor round(1/r))
    dense + m @ r* (= ...)       dense + m at the keep ratio r* whose LLM FLOPs equal those of the VISOR row named
                                 in brackets (packing rows are matched with visionzip: dense has no packing layer)

Timings (medians, round-robin over rows as in bench_prefill):
- vision: SigLIP + projector on the image's crops, shared by every row (measured once per repeat);
- selection: what reduction adds after the vision tower: the scoring SigLIP layer's attention scores (from query
  and key projections of their real shape), LLaVA-OV's token layout and the per-tile selection, or the packing
  projection;
- LLM prefill: the model's forward from precomputed (reduced) features: prompt compaction, decoder, lm_head on
  the last position. TTFT = vision + selection + LLM prefill.
FLOPs: `visor_hf.flops.count_flops(..., token_reduction=, image_size=)`; the FLOPs ratio is dense's LLM FLOPs
over the row's LLM + selection FLOPs.

This module measures and returns rows (medians and FLOPs); `report.py` derives the ratios and writes the table,
the plot and the BENCHMARKS.md section (`bench_prefill.py` calls both).
"""

from __future__ import annotations

import contextlib
import statistics

import torch

import common
from visor_hf import VisorForConditionalGeneration
from visor_hf.baselines import TokenReducedLlavaOnevision
from visor_hf.configuration_visor import num_visual_tokens, validate_token_reduction
from visor_hf.flops import count_flops, keep_ratio_for_flops, num_crops_for_image
from visor_hf.modeling_visor import attention_received, image_token_layout, reduce_image_tokens

PRUNING = ("visionzip", "vispruner")


def parse_image_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(x) for x in text.lower().split("x"))
    except ValueError:
        height = width = 0
    if height <= 0 or width <= 0:
        raise ValueError(f"--image-sizes {text!r}: use HEIGHTxWIDTH with positive sizes, e.g. 768x768")
    return height, width


def reduction_setting(method: str, keep_ratio: float, vision_layers: int) -> dict:
    """The full setting (None at keep ratio 1: no reduction)."""
    if method == "pack":
        return validate_token_reduction({"method": "pack", "pack_factor": max(1, round(1 / keep_ratio))})
    # the scoring layer: SigLIP's penultimate (the default), or the only layer of a one-layer tower
    return validate_token_reduction({"method": method, "keep_ratio": keep_ratio, "score_layer": -min(2, vision_layers)})


def label(setting: dict) -> str:
    if setting["method"] == "pack":
        return f"pack x{setting['pack_factor']}"
    return f"{setting['method']} @ {setting['keep_ratio']:.3g}"


def packing_model(llava, visor, factor: int):
    """VISOR with a (mean-initialised) packing layer of `factor`, on the very weights of `visor`."""
    model = VisorForConditionalGeneration.from_llava_onevision(
        llava, cross_attn_layers=visor.config.cross_attn_layers, self_attn_layers=visor.config.self_attn_layers,
        token_reduction={"method": "pack", "pack_factor": factor},
    ).eval()
    shared = dict(visor.named_parameters())
    for name, parameter in model.named_parameters():
        if name in shared:
            parameter.data = shared[name].data
    return model.to(next(visor.parameters()).device)


@contextlib.contextmanager
def precomputed_reduction(target, reduced: list, kept: list):
    """`target.reduce_visual_tokens` (a VisorModel or a TokenReducedLlavaOnevision) returns the given result."""
    target.reduce_visual_tokens = lambda *args, **kwargs: (reduced, kept)  # the instance attribute shadows the method
    try:
        yield
    finally:
        del target.reduce_visual_tokens


def reduction_settings(args, vision_layers: int) -> list[dict]:
    """The setting of each --token-reduction method at --keep-ratio; an error where one would keep every token."""
    settings = [reduction_setting(m, args.keep_ratio, vision_layers) for m in args.token_reduction]
    for method, setting in zip(args.token_reduction, settings):
        if setting is None:
            raise ValueError(f"--keep-ratio {args.keep_ratio} keeps every token for {method}"
                             + (" (pack factor round(1 / r) = 1)" if method == "pack" else "") + ": nothing to compare")
    return settings


def plan_rows(config, settings: list[dict], budgets: list, image_size, num_text: int, vision_layers: int) -> list[dict]:
    """The rows of one image, in order, with their FLOPs and kept tokens: dense, dense + each pruning method, each
    budget alone and with each reduction, then dense + pruning at the keep ratio matching each VISOR row's LLM FLOPs."""
    num_visual, num_crops = num_visual_tokens(config, image_size), num_crops_for_image(config, image_size)

    def row(name, kind, budget, setting, matched_to=None) -> dict:
        counted = count_flops(config, num_visual, num_text, "full" if budget is None else budget, num_crops=num_crops,
                              token_reduction=setting, image_size=image_size)
        return {"image_size": f"{image_size[0]}x{image_size[1]}", "num_visual": num_visual, "num_text": num_text,
                "model": name, "kind": kind, "budget": budget, "setting": setting, "matched_to": matched_to,
                "kept": counted["num_vision_tokens_kept"], "flops_llm": counted[kind]["llm"],
                "flops_selection": counted[kind]["breakdown"].get("token_selection", 0)}

    rows = [row("dense", "dense", None, None)]
    rows += [row(f"dense + {label(s)}", "dense", None, s) for s in settings if s["method"] in PRUNING]
    for budget in budgets:
        rows.append(row(f"VISOR {budget}", "visor", budget, None))
        rows += [row(f"VISOR {budget} + {label(s)}", "visor", budget, s) for s in settings]
    for visor_row in [r for r in rows if r["kind"] == "visor"]:
        target, setting = visor_row["flops_llm"], visor_row["setting"]
        method = setting["method"] if setting is not None and setting["method"] in PRUNING else "visionzip"
        ratio = keep_ratio_for_flops(config, image_size, num_text, method, target)
        matched = row("", "dense", None, reduction_setting(method, ratio, vision_layers), visor_row["model"])
        # newline tokens are always kept: dense + pruning may not get down to the target at any ratio
        reached = abs(matched["flops_llm"] - target) <= 0.02 * target
        matched["model"] = f"dense + {method} @ {ratio:.3g} ({'=' if reached else 'closest to'} {visor_row['model']})"
        rows.append(matched)
    return rows


def bench_image(args, llava, visor, budgets, image_size, clock, generator) -> list[dict]:
    """Every row at one image size."""
    config, device, dtype = visor.config, args.device, getattr(torch, args.dtype)
    num_visual, num_crops = num_visual_tokens(config, image_size), num_crops_for_image(config, image_size)
    crop = config.vision_config.image_size
    vision_layers = config.vision_config.num_hidden_layers
    tower = getattr(llava.model.vision_tower, "vision_model", llava.model.vision_tower)
    input_ids = common.make_prompt(config, num_visual, args.text_tokens, None, generator).to(device)
    num_text = int((input_ids != config.image_token_id).sum())
    inputs = common.placeholder_inputs(input_ids, image_size, device, dtype)
    features = (0.02 * torch.randn(num_visual, config.text_config.hidden_size, generator=generator)).to(device, dtype)
    pixel_values = torch.randn(num_crops, 3, crop, crop, generator=generator).to(device, dtype)
    tokens, width = (crop // config.vision_config.patch_size) ** 2, config.vision_config.hidden_size
    # the scoring layer's query and key projections, which the model captures as the tower runs
    queries, keys = (torch.randn(num_crops, tokens, width, generator=generator).to(device, dtype) for _ in range(2))

    settings = reduction_settings(args, vision_layers)
    packers = {s["pack_factor"]: packing_model(llava, visor, s["pack_factor"]) for s in settings if s["method"] == "pack"}

    def select(setting):
        """Reduced features and kept mask, as VisorModel.reduce_visual_tokens computes them after the tower."""
        scores = None
        if setting["method"] != "pack":
            attention = tower.encoder.layers[setting["score_layer"]].self_attn
            scores = attention_received(queries, keys, attention.num_heads, attention.scale)
        (newline, token_scores, base), = image_token_layout(config, [image_size], None, scores, device)
        packer = packers[setting["pack_factor"]].model.token_packer if setting["method"] == "pack" else None
        chosen, positions = reduce_image_tokens(features, newline, token_scores, base, setting, packer)
        mask = torch.zeros(num_visual, dtype=torch.bool, device=device)
        mask[positions] = True
        return [chosen], [mask]

    rows = plan_rows(config, settings, budgets, image_size, num_text, vision_layers)
    for row in rows:
        row.update(vision_s=[], select_s=[], prefill_s=[])

    call_kwargs = {"use_cache": True, "logits_to_keep": 1}  # what generate asks of a prefill

    def prefill_call(kind, budget, setting):
        """The timed call of a row and the object whose reduce_visual_tokens it runs (None without reduction)."""
        if kind == "dense" and setting is None:
            return (lambda: llava(**inputs, **call_kwargs)), None
        if setting is None:
            return (lambda: visor(**inputs, budget=budget, **call_kwargs)), None
        if kind == "dense":
            wrapper = TokenReducedLlavaOnevision(llava, setting)
            return (lambda: wrapper(**inputs, **call_kwargs)), wrapper
        model = packers[setting["pack_factor"]] if setting is not None and setting["method"] == "pack" else visor
        return (lambda: model(**inputs, budget=budget, token_reduction=setting, **call_kwargs)), model.model

    with torch.inference_mode(), common.precomputed_image_features(llava, visor, features):
        for repeat in range(args.warmup + args.repeats):
            timed = repeat >= args.warmup
            _, vision_s = clock(lambda: common.vision_encoder(llava, pixel_values), retry=timed)
            for row in rows:
                setting, reduced, kept, select_s = row["setting"], None, None, 0.0
                if setting is not None:
                    (reduced, kept), select_s = clock(lambda: select(setting), retry=timed)
                    if int(kept[0].sum()) != row["kept"]:
                        raise AssertionError(f"{row['model']}: {int(kept[0].sum())} tokens kept, count_flops says "
                                             f"{row['kept']}")
                call, reducer = prefill_call(row["kind"], row["budget"], setting)
                with precomputed_reduction(reducer, reduced, kept) if reducer is not None else contextlib.nullcontext():
                    _, prefill_s = clock(call, retry=timed)
                if timed:
                    row["vision_s"].append(vision_s)
                    row["select_s"].append(select_s)
                    row["prefill_s"].append(prefill_s)
    return finish(rows)


def finish(rows: list[dict]) -> list[dict]:
    """Medians of the timings (the lists stay under `*_all`)."""
    median = lambda xs: statistics.median(xs) if xs else float("nan")
    for row in rows:
        for key in ("vision_s", "select_s", "prefill_s"):
            row[key + "_all"], row[key] = row[key], median(row[key])
    return rows


def run(args, llava, visor, budgets, clock, generator) -> list[dict]:
    """The rows of every image size of `args.image_sizes`."""
    import report

    rows = []
    for image_size in args.image_sizes:
        size_rows = bench_image(args, llava, visor, budgets, image_size, clock, generator)
        rows += size_rows
        print(report.token_reduction_table(size_rows), flush=True)
    return rows
