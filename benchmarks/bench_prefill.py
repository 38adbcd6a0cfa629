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

Usage:
    python benchmarks/bench_prefill.py --smoke --output-dir /tmp/bench           # seconds, tiny shapes
    python benchmarks/bench_prefill.py --tiny-vision --benchmarks-md BENCHMARKS.md  # CPU, real LLM shapes
    python benchmarks/bench_prefill.py --device cuda --dtype bfloat16 --attn sdpa --vision-tokens 729 1485 2916 7290 \\
        --benchmarks-md BENCHMARKS.md
    python benchmarks/bench_prefill.py --device cuda --language-model qwen2-7b --vision-tokens 2916 7290  # compute-bound
    python benchmarks/bench_prefill.py --device cuda --batch-size 8 --vision-tokens 2916                # throughput
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import transformers
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from visor_hf import VisorForConditionalGeneration
from visor_hf.flops import cache_nbytes, count_flops, default_num_crops, kv_cache_bytes

TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5
CACHE_KW = "cache" if TRANSFORMERS_V5 else "past_key_values"  # the cache argument of the dense model's forward
IMAGE_TOKEN_ID = 151646  # LLaVA-OV's <image>
MiB = 2**20

# llava-onevision-qwen2-0.5b-ov: Qwen2-0.5B and SigLIP-so400m (26 of its 27 layers kept)
QWEN2_05B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)
# llava-onevision-qwen2-7b-ov: Qwen2-7B (same vision tower); on a GPU the 0.5B model at batch 1 is bound by kernel
# launches, the 7B one by arithmetic
QWEN2_7B = dict(
    model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)
LANGUAGE_MODELS = {"qwen2-0.5b": ("Qwen2-0.5B", QWEN2_05B), "qwen2-7b": ("Qwen2-7B", QWEN2_7B)}
DEFAULT_LANGUAGE_MODEL = "qwen2-0.5b"
SIGLIP_400M = dict(
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
    num_attention_heads=16, image_size=384, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False,
)
TINY_VISION = dict(SIGLIP_400M, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
# --smoke: 24 layers so that budgets 0, 2, 4, 8 exist; 56-px crops of 16 tokens
SMOKE_TEXT = dict(QWEN2_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, max_position_embeddings=4096)
SMOKE_VISION = dict(TINY_VISION, hidden_size=32, intermediate_size=64, image_size=56)
SMOKE_IMAGE_TOKEN_ID = 500


# --------------------------------------------------------------------------------------------------
# Arguments and models
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring for what each column measures.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                        help="attention implementation of both models (VISOR runs sdpa where flash is asked)")
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
    parser.add_argument("--batch-size", type=int, default=1,
                        help="prompts run together (the same prompt repeated; default 1). On a GPU a larger batch "
                             "turns launch-bound timings into arithmetic-bound ones")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model first (memory is sampled there)")
    parser.add_argument("--language-model", default=DEFAULT_LANGUAGE_MODEL, choices=sorted(LANGUAGE_MODELS),
                        help=f"shapes of the language model (default {DEFAULT_LANGUAGE_MODEL}; qwen2-7b: about 50 GB "
                             "of GPU memory while the models are built in float32, 31 GB after)")
    parser.add_argument("--tiny-vision", action="store_true", help="a one-layer 64-wide vision tower (isolates the LLM)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat: checks the script in seconds")
    parser.add_argument("--output-dir", default="benchmarks/results", help="table (.md), raw results (.json), plots (.png)")
    parser.add_argument("--benchmarks-md", default=None,
                        help="also write the table into this markdown file, in this script's own section")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be at least 1")
    if args.batch_size > 1 and args.token_reduction:
        parser.error("--batch-size applies without --token-reduction only (the reduction tables are per prompt)")
    if args.smoke:
        args.vision_tokens = args.vision_tokens or [32, 64]
        args.text_tokens, args.new_tokens, args.repeats = 16, 4, 1
        args.threads = args.threads or 1  # two threads on a busy 2-core machine can run 10x slower
    args.vision_tokens = args.vision_tokens or ([729, 1485, 2916, 7290] if args.device == "cuda" else [729, 1485, 2916])
    args.budgets = args.budgets or (["2"] if args.token_reduction else ["0", "2", "4", "8", "auto"])
    if not args.token_reduction and (args.image_sizes or "--keep-ratio" in (argv if argv is not None else sys.argv)):
        parser.error("--image-sizes and --keep-ratio apply with --token-reduction only")
    if args.token_reduction:
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
    return args


def build_models(args):
    """Dense LLaVA-OV with random weights and VISOR grafted onto the same weights, both in eval mode."""
    text = SMOKE_TEXT if args.smoke else LANGUAGE_MODELS[args.language_model][1]
    vision = SMOKE_VISION if args.smoke else (TINY_VISION if args.tiny_vision else SIGLIP_400M)
    crop = vision["image_size"]
    config = LlavaOnevisionConfig(
        text_config=dict(text), vision_config=dict(vision),
        image_token_index=SMOKE_IMAGE_TOKEN_ID if args.smoke else IMAGE_TOKEN_ID,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[crop * h, crop * w] for h in range(1, 7) for w in range(1, 7)],
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        llava = LlavaOnevisionForConditionalGeneration(config)
    llava = llava.to(getattr(torch, args.dtype)).eval()
    with torch.device(args.device):  # VISOR's own modules are built there too, not on the CPU first
        visor = VisorForConditionalGeneration.from_llava_onevision(llava).eval()
    # Both models read the very same weight tensors (VISOR keeps LLaVA-OV's key names): half the memory, and no
    # difference in where the weights sit in memory between the two.
    dense_parameters = dict(llava.named_parameters())
    for name, parameter in visor.named_parameters():
        if name in dense_parameters:
            parameter.data = dense_parameters[name].data
    release_memory()
    return llava, visor


def parse_budgets(names: list[str], visor) -> list:
    budgets = []
    for name in names:
        if name == "auto" and visor.config.routing_token_id is None:
            print("note: budget 'auto' skipped: config.routing_token_id is None (a freshly grafted model has no "
                  "routing token or trained router; convert with one to benchmark the router)")
            continue
        budgets.append(int(name) if name.lstrip("-").isdigit() else name)
    return budgets


def make_prompt(config, num_visual: int, num_text: int, routing_token_id, generator) -> torch.Tensor:
    """(1, S) ids: a system/user preamble of min(14, N_t // 4) tokens, N_v image placeholders, the question
    (and the routing token, if the model has one), like LLaVA-OV's chat template around one image."""
    vocab = config.text_config.vocab_size
    image_token = config.image_token_id

    def text(n):
        ids = torch.randint(3, vocab, (n,), generator=generator)
        return torch.where(ids == image_token, ids - 1, ids)

    before = min(14, num_text // 4)
    after = num_text - before - (routing_token_id is not None)
    parts = [text(before), torch.full((num_visual,), image_token), text(after)]
    if routing_token_id is not None:
        parts.append(torch.tensor([routing_token_id]))
    return torch.cat(parts).unsqueeze(0)


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes used, including time the hypervisor stole; CPU seconds this process used)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    times = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), times.user + times.system


class Clock:
    """Seconds a call takes: perf_counter on the CPU, CUDA events (after a synchronize) on the GPU.

    On a shared CPU machine a call is run again (up to `retries` times) when other processes or the hypervisor
    took more than `max_background` cores during it; `background` keeps the load seen by each kept sample.
    Calls shorter than 0.2 s are not checked (/proc/stat counts in 10 ms ticks).
    """

    def __init__(self, device: str, max_background: float = 0.25, retries: int = 3, max_wait: float = 3600.0):
        self.cuda, self.max_background, self.retries, self.max_wait = device == "cuda", max_background, retries, max_wait
        self.background: list[float] = []
        self.rerun, self.waited = 0, 0.0

    def wait_for_quiet(self, window: float = 0.5) -> None:
        """Before a timed attempt: wait (up to `max_wait` s in all) until other processes leave the CPU alone."""
        while self.waited < self.max_wait:
            busy0, own0 = cpu_seconds()
            time.sleep(window)
            busy1, own1 = cpu_seconds()
            if (busy1 - busy0) - (own1 - own0) <= self.max_background * window:
                return
            self.waited += window

    def __call__(self, fn, setup=None, retry: bool = True):
        """Time `fn()`, or `fn(setup())` with `setup` run untimed before each attempt (e.g. a fresh copy of a cache).
        `retry=False`: one attempt whatever the background load (warm-up runs)."""
        if self.cuda:
            state = setup() if setup is not None else None
            call = fn if setup is None else (lambda: fn(state))
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = call()
            end.record()
            torch.cuda.synchronize()
            return result, start.elapsed_time(end) / 1000
        for attempt in range(self.retries + 1):
            state = setup() if setup is not None else None
            if retry:
                self.wait_for_quiet()
            busy0, own0 = cpu_seconds()
            start = time.perf_counter()
            result = fn() if setup is None else fn(state)
            seconds = time.perf_counter() - start
            busy1, own1 = cpu_seconds()
            background = max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds
            if not retry:
                return result, seconds
            if seconds < 0.2 or background <= self.max_background or attempt == self.retries:
                break
            self.rerun += 1
            del result, state
            time.sleep(1.0)
        if seconds >= 0.2:
            self.background.append(background)
        return result, seconds


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):  # glibc: hand freed heap pages back so that RSS growth is not hidden
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory growth inside the block: RSS sampled by a thread (CPU) or the CUDA allocator's peak."""

    def __init__(self, device: str, interval: float = 0.002):
        self.cuda, self.interval, self.peak_growth = device == "cuda", interval, 0

    def __enter__(self):
        release_memory()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = rss_bytes()
        self.running = True

        def sample():
            while self.running:
                self.peak = max(self.peak, rss_bytes())
                time.sleep(self.interval)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_growth = torch.cuda.max_memory_allocated() - self.start
            return
        self.running = False
        self.thread.join()
        self.peak_growth = max(self.peak, rss_bytes()) - self.start


# --------------------------------------------------------------------------------------------------
# The measured stages
# --------------------------------------------------------------------------------------------------


def output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def vision_encoder(llava, pixel_values) -> torch.Tensor:
    """SigLIP + projector: the compute of LLaVA-OV's get_image_features, without its anyres packing."""
    model, config = llava.model, llava.config
    hidden_states = model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    layer = config.vision_feature_layer
    selected = hidden_states[layer] if isinstance(layer, int) else torch.cat([hidden_states[i] for i in layer], dim=-1)
    if config.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    return model.multi_modal_projector(selected)


@contextlib.contextmanager
def precomputed_image_features(llava, visor, features: torch.Tensor, num_images: int = 1):
    """Both models' image-feature functions return `features` (N_v, H) for each of `num_images` images instead of
    running the vision encoder."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    def dense_features(*args, **kwargs):
        per_image = [features] * num_images
        return BaseModelOutputWithPooling(pooler_output=per_image) if TRANSFORMERS_V5 else per_image

    if not hasattr(visor.model, "visual_features"):
        raise AttributeError("VisorModel.visual_features is gone: update precomputed_image_features")
    llava.model.get_image_features = dense_features  # instance attributes shadow the methods
    visor.model.visual_features = lambda *args, **kwargs: [features] * num_images
    try:
        yield
    finally:
        del llava.model.get_image_features, visor.model.visual_features


def prefill(model, inputs: dict, budget):
    extra = {} if budget is None else {"budget": budget}
    out = model(**inputs, use_cache=True, logits_to_keep=1, **extra)
    return out.logits[:, -1:].argmax(-1), output_cache(out), getattr(out, "self_attn_layers", None)


def decode(model, token: torch.Tensor, cache, steps: int) -> None:
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{CACHE_KW: cache})
        token, cache = out.logits[:, -1:].argmax(-1), output_cache(out)


def physical_limit(llava, visor, text_ids: torch.Tensor, features: torch.Tensor) -> None:
    """Budget 0's floor: the language model on the text tokens alone, plus the cross-attention key/value
    projections of the visual tokens (what no VISOR configuration can skip)."""
    hidden = llava.model.language_model(input_ids=text_ids, use_cache=True).last_hidden_state
    llava.lm_head(hidden[:, -1:])
    visual = features.unsqueeze(0).expand(text_ids.shape[0], -1, -1)
    for cross in visor.model.cross_attn.values():
        cross.k_proj(visual), cross.v_proj(visual)


def bench_size(args, llava, visor, budgets, num_visual: int, clock: Clock, generator) -> list[dict]:
    """Every model at one N_v; returns one row per model (dense, each budget, physical limit)."""
    config, device, dtype = visor.config, args.device, getattr(torch, args.dtype)
    crop = config.vision_config.image_size
    num_crops = default_num_crops(config, num_visual)
    batch = args.batch_size
    prompt = make_prompt(config, num_visual, args.text_tokens, config.routing_token_id, generator).to(device)
    num_text = int((prompt != config.image_token_id).sum())
    input_ids = prompt.expand(batch, -1).contiguous()
    text_ids = prompt[prompt != config.image_token_id].unsqueeze(0).expand(batch, -1).contiguous()
    features = (0.02 * torch.randn(num_visual, config.text_config.hidden_size, generator=generator)).to(device, dtype)
    pixel_values = torch.randn(num_crops * batch, 3, crop, crop, generator=generator).to(device, dtype)
    # The feature functions are replaced, so the pixels only need to exist (one image of crop x crop a prompt).
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": torch.zeros(batch, 1, 3, 1, 1, device=device, dtype=dtype),
              "image_sizes": torch.tensor([[crop, crop]] * batch, device=device)}

    entries = [("dense", llava, None)] + [(f"VISOR {b}", visor, b) for b in budgets]
    rows = {name: {"model": name, "budget": budget, "num_visual": num_visual, "num_text": num_text, "num_crops": num_crops,
                   "prefill_s": [], "decode_s": [], "vision_s": []} for name, _, budget in entries}
    limit = {"model": "physical limit", "budget": None, "num_visual": num_visual, "num_text": num_text,
             "num_crops": num_crops, "prefill_s": [], "decode_s": [], "vision_s": []}

    with torch.inference_mode(), precomputed_image_features(llava, visor, features, num_images=batch):
        for repeat in range(args.warmup + args.repeats):
            timed = repeat >= args.warmup
            _, seconds = clock(lambda: vision_encoder(llava, pixel_values), retry=timed)
            if timed:
                for row in rows.values():
                    row["vision_s"].append(seconds)
            for name, model, budget in entries:
                row = rows[name]
                # Memory is sampled in the first (warm-up) run only, so that the sampler never runs beside a timing.
                with PeakMemory(device) if repeat == 0 else contextlib.nullcontext() as memory:
                    (token, cache, layers), prefill_s = clock(lambda: prefill(model, inputs, budget), retry=timed)
                    kv_bytes = cache_nbytes(cache)["total"]  # after prefill, before decoding grows it
                    if timed:  # decoding grows the cache in place: each attempt starts from a copy of it
                        _, decode_s = clock(lambda c: decode(model, token, c, args.new_tokens), setup=lambda: copy.deepcopy(cache))
                    else:
                        _, decode_s = clock(lambda: decode(model, token, cache, args.new_tokens), retry=False)
                if repeat == 0:
                    row["peak_memory"], row["kv_bytes"] = memory.peak_growth, kv_bytes
                    row["self_attn_layers"] = list(layers[0]) if layers else None
                if timed:
                    row["prefill_s"].append(prefill_s)
                    row["decode_s"].append(decode_s / max(1, args.new_tokens))
                del token, cache
            _, seconds = clock(lambda: physical_limit(llava, visor, text_ids, features), retry=timed)
            if timed:
                limit["prefill_s"].append(seconds)
    return finish_rows(args, config, list(rows.values()), limit)


def finish_rows(args, config, rows: list[dict], limit: dict) -> list[dict]:
    """Medians, FLOPs, ratios and the KV bound."""
    median = lambda xs: statistics.median(xs) if xs else float("nan")
    dense = rows[0]
    for row in rows + [limit]:
        for key in ("prefill_s", "decode_s", "vision_s"):
            row[key + "_all"] = row[key]
            row[key] = median(row[key])
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
    zero = count_flops(config, limit["num_visual"], limit["num_text"], 0)["visor"]
    parts = zero["breakdown"]
    limit["flops_llm"] = (zero["llm"] - parts["cross_text_proj"] - parts["cross_scores"] - parts["cpe"]) * args.batch_size
    limit["flops_vision"] = zero["vision_encoder"] * args.batch_size
    for row in rows + [limit]:
        row["ttft_s"] = row["vision_s"] + row["prefill_s"] if row is not limit else float("nan")
        row["flops_ratio"] = dense["flops_llm"] / row["flops_llm"]
        row["speedup"] = dense["prefill_s"] / row["prefill_s"]
        row["efficiency"] = row["speedup"] / row["flops_ratio"]
    return rows + [limit]


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return "—" if seconds != seconds else f"{seconds * 1000:,.1f}"


def markdown_table(rows: list[dict]) -> str:
    header = ("| N_v | model | S | LLM GFLOPs | FLOPs ratio | vision ms | LLM prefill ms | speed-up | speed-up / FLOPs ratio "
              "| TTFT ms | decode ms/token | KV MiB (bound) | peak mem MiB |")
    lines = [header, "|" + "|".join([" --- "] * (header.count("|") - 1)) + "|"]
    for row in rows:
        layers = row.get("self_attn_layers")
        s = "all" if row["model"] == "dense" else ("—" if layers is None else (",".join(map(str, layers)) or "∅"))
        kv = "—" if "kv_bytes" not in row else f"{row['kv_bytes'] / MiB:,.1f} ({row['kv_bound'] / MiB:,.1f})"
        mem = "—" if "peak_memory" not in row else f"{row['peak_memory'] / MiB:,.0f}"
        decode = "—" if row["model"] == "physical limit" else ms(row["decode_s"])
        lines.append(
            f"| {row['num_visual']} | {row['model']} | {s} | {row['flops_llm'] / 1e9:,.1f} | {row['flops_ratio']:.1f}x "
            f"| {ms(row['vision_s'])} | {ms(row['prefill_s'])} | {row['speedup']:.1f}x | {row['efficiency']:.2f} "
            f"| {ms(row['ttft_s'])} | {decode} | {kv} | {mem} |"
        )
    return "\n".join(lines)


def check_targets(rows: list[dict], num_layers: int, num_cross: int) -> list[str]:
    """The issue's targets, one line each: met or missed, with the numbers."""
    lines = []
    by_size: dict[int, list[dict]] = {}
    for row in rows:
        by_size.setdefault(row["num_visual"], []).append(row)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    for num_visual, group in sorted(by_size.items()):
        dense = group[0]
        limit = next(r for r in group if r["model"] == "physical limit")
        for row in group[1:-1]:
            budget = row["budget"]
            k = len(row["self_attn_layers"] or [])
            if num_visual >= 1485 and isinstance(budget, int) and budget >= 2:
                ok = row["speedup"] >= 0.8 * row["flops_ratio"]
                lines.append(f"- N_v={num_visual} budget {budget}: speed-up {row['speedup']:.1f}x vs FLOPs ratio "
                             f"{row['flops_ratio']:.1f}x ({row['efficiency']:.2f} of it; target >= 0.8): {verdict(ok)}")
            if budget == 0:
                if num_visual == 2916:
                    lines.append(f"- N_v=2916 budget 0: {row['speedup']:.1f}x faster than dense (target >= 20x): "
                                 f"{verdict(row['speedup'] >= 20)}")
                ratio = row["prefill_s"] / limit["prefill_s"]
                lines.append(f"- N_v={num_visual} budget 0: prefill {ratio:.2f}x the physical limit (target <= 1.5x): "
                             f"{verdict(ratio <= 1.5)}")
            ratio = row["decode_s"] / dense["decode_s"]
            lines.append(f"- N_v={num_visual} budget {budget}: decode {ratio:.2f}x dense's time per token (target <= 1): "
                         f"{verdict(ratio <= 1.0)}")
            if "kv_bytes" in row and "kv_bytes" in dense:
                # dense caches N_v + N_t tokens in every layer: split its measured bytes into visual and text parts
                num_text = row["num_text"]
                numerator = (k + num_cross) * num_visual + num_layers * num_text  # exact integer comparison
                bound = dense["kv_bytes"] * numerator / (num_layers * (num_visual + num_text))
                ok = row["kv_bytes"] * num_layers * (num_visual + num_text) <= dense["kv_bytes"] * numerator
                lines.append(f"- N_v={num_visual} budget {budget}: KV {row['kv_bytes'] / MiB:,.2f} MiB vs bound "
                             f"{bound / MiB:,.2f} MiB ((|S|+|C|)/L of dense's visual part + text part): {verdict(ok)}")
    return lines


def plot(rows: list[dict], output_dir: Path, tag: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["num_visual"] for r in rows})
    paths = []

    fig, ax = plt.subplots(figsize=(6, 5))
    for num_visual in sizes:
        group = [r for r in rows if r["num_visual"] == num_visual and r["model"].startswith("VISOR")]
        ax.plot([r["flops_ratio"] for r in group], [r["speedup"] for r in group], "o-", label=f"N_v = {num_visual}")
        for r in group:
            ax.annotate(str(r["budget"]), (r["flops_ratio"], r["speedup"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ratios = [r["flops_ratio"] for r in rows if r["model"].startswith("VISOR")]
    line = [min(ratios + [1]), max(ratios + [1])]
    ax.plot(line, line, "k--", lw=1, label="speed-up = FLOPs ratio")
    ax.plot(line, [0.8 * x for x in line], "k:", lw=1, label="0.8 x FLOPs ratio")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("LLM FLOPs ratio (dense / VISOR)"), ax.set_ylabel("measured LLM prefill speed-up")
    ax.set_title(f"VISOR budgets vs dense LLaVA-OV ({tag})"), ax.legend(fontsize=8), ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    paths.append(output_dir / f"speedup_vs_flops_{tag}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4.5), squeeze=False)
    for ax, num_visual in zip(axes[0], sizes):
        group = [r for r in rows if r["num_visual"] == num_visual and r["model"] != "physical limit"]
        names = [r["model"].replace("VISOR ", "b=") for r in group]
        vision = [r["vision_s"] for r in group]
        prefill_s = [r["prefill_s"] for r in group]
        decode_total = [r["decode_s"] * r.get("new_tokens", 0) for r in group]
        ax.bar(names, vision, label="vision encoder")
        ax.bar(names, prefill_s, bottom=vision, label="LLM prefill")
        ax.bar(names, decode_total, bottom=[a + b for a, b in zip(vision, prefill_s)], label=f"decode ({group[0].get('new_tokens', 0)} tokens)")
        ax.set_title(f"N_v = {num_visual}"), ax.set_ylabel("seconds")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Latency: dense LLaVA-OV vs VISOR budgets ({tag})")
    fig.tight_layout()
    paths.append(output_dir / f"latency_{tag}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def code_version() -> str:
    """The commit the package was imported from, and whether the modeling file differs from it. VISOR_CODE_VERSION
    overrides it, for copies of the tree whose git metadata is not the code's (e.g. a tree sent to a GPU machine)."""
    import subprocess

    if os.environ.get("VISOR_CODE_VERSION"):
        return os.environ["VISOR_CODE_VERSION"]

    import visor_hf.modeling_visor as modeling

    root = Path(modeling.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "visor_hf/modeling_visor.py"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return f"{commit}{' (modeling_visor.py modified)' if dirty else ''}" if commit else "unknown"


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return f"{platform.processor() or platform.machine()} CPU"


def environment(args) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    return (f"{device}, {torch.get_num_threads()} torch threads ({os.cpu_count()} cores visible), torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}, dtype {args.dtype}, "
            f"attention {args.attn}")


def run_tag(args) -> str:
    """Names this run's files and BENCHMARKS.md section: device, and what differs from the default shapes."""
    if args.smoke:
        return "smoke-" + args.device
    return (args.device + ("-tiny-vision" if args.tiny_vision else "")
            + ("" if args.language_model == DEFAULT_LANGUAGE_MODEL else "-" + args.language_model)
            + ("" if args.batch_size == 1 else f"-batch{args.batch_size}"))


def shapes_text(args) -> str:
    if args.smoke:
        return "smoke shapes (24 tiny layers)"
    return (f"{LANGUAGE_MODELS[args.language_model][0]} language model + "
            + ("a one-layer 64-wide vision tower (--tiny-vision)" if args.tiny_vision
               else "SigLIP-400M (26 layers, 384 px, patch 14)"))


def section(args, rows, targets, plots, command: str, clock: Clock) -> str:
    shapes = shapes_text(args)
    body = [
        f"Command: `{command}`",
        "",
        f"Machine: {environment(args)}. Code: {args.code}. Shapes: {shapes}; N_t = {args.text_tokens} text tokens; batch {args.batch_size}; "
        f"median of {args.repeats} runs after {args.warmup} warm-up; decode over {args.new_tokens} new tokens.",
        "",
        *([background_note(clock)] if not clock.cuda else []),
        markdown_table(rows),
        "",
        "Targets:",
        "",
        *targets,
        "",
        *[f"![{p.stem}]({p.as_posix()})" for p in plots],
    ]
    return "\n".join(body)


def background_note(clock: Clock) -> str:
    """How much CPU other processes (or the hypervisor) took during the kept timings, on a shared machine."""
    load = sorted(clock.background)
    if not load:
        return ""
    return (f"Background load during the kept timings (CPU cores taken by other processes or stolen): median "
            f"{statistics.median(load):.2f}, max {load[-1]:.2f}; {clock.rerun} timings were re-run because it "
            f"exceeded {clock.max_background} cores; {clock.waited:.0f} s spent waiting for a quiet CPU before timings.\n")


def update_markdown(path: Path, key: str, title: str, text: str) -> None:
    """Replace (or append) this script's section, between its markers; the rest of the file is left as is."""
    begin, end = f"<!-- bench_prefill:{key}:begin -->", f"<!-- bench_prefill:{key}:end -->"
    block = f"{begin}\n## {title}\n\n{text}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(current)


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.code = code_version()  # at start: the modeling file may change while a long run goes on
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else " ".join(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"building models ({'smoke' if args.smoke else 'real'} shapes) ...", flush=True)
    start = time.perf_counter()
    llava, visor = build_models(args)
    print(f"built in {time.perf_counter() - start:.1f}s; {environment(args)}", flush=True)
    budgets = parse_budgets(args.budgets, visor)
    clock = Clock(args.device, retries=0, max_wait=0) if args.smoke else Clock(args.device)  # smoke: timings not taken seriously
    generator = torch.Generator().manual_seed(args.seed)

    if args.token_reduction:
        import token_reduction_rows

        args.budget_values = budgets
        return token_reduction_rows.run(args, sys.modules[__name__], llava, visor, clock, generator, command)

    rows = []
    for num_visual in args.vision_tokens:
        start = time.perf_counter()
        size_rows = bench_size(args, llava, visor, budgets, num_visual, clock, generator)
        for row in size_rows:
            row["new_tokens"] = args.new_tokens
        rows.extend(size_rows)
        print(f"N_v={num_visual} done in {time.perf_counter() - start:.0f}s", flush=True)
        print(markdown_table(size_rows), flush=True)

    tag = run_tag(args)
    targets = check_targets(rows, visor.config.num_layers, len(visor.config.cross_attn_layers))
    plots = plot(rows, output_dir, tag)
    text = section(args, rows, targets, plots, command, clock)
    (output_dir / f"prefill_{tag}.md").write_text(text + "\n")
    (output_dir / f"prefill_{tag}.json").write_text(json.dumps({"args": vars(args), "rows": rows, "background": clock.background, "reruns": clock.rerun}, indent=1, default=str))
    print("\n" + text)
    if args.benchmarks_md:
        title = (f"Prefill and decode: VISOR vs dense LLaVA-OV ({args.device.upper()}{', smoke' if args.smoke else ''}"
                 f"{', ' + LANGUAGE_MODELS[args.language_model][0] if args.language_model != DEFAULT_LANGUAGE_MODEL else ''}"
                 f"{f', batch {args.batch_size}' if args.batch_size > 1 else ''})")
        update_markdown(Path(args.benchmarks_md), tag, title, text)
        print(f"updated {args.benchmarks_md}")
    return rows


if __name__ == "__main__":
    main()
