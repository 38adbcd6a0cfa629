"""What the benchmark scripts share: model shapes, the two models on one set of weights, prompts, the clock, the
peak-memory sampler, the precomputed-feature patch, the stages every script times, and the machine description.

The scripts that measure (`bench_prefill.py`, `token_reduction_rows.py`, `count_ops.py`, `profile_prefill.py`)
import this module; `report.py` turns their rows into tables, verdicts, plots and BENCHMARKS.md sections.
Design choices:

- One weight set: dense is transformers' own `LlavaOnevisionForConditionalGeneration` with random weights, and VISOR
  is grafted onto the very same tensors (`VisorForConditionalGeneration.from_llava_onevision`), so the two differ only
  in what they compute. Weights are random: timings do not depend on their values.
- The vision tower is timed apart: both models' image-feature functions (`get_image_features` of dense,
  `visual_features` of VISOR) are patched to return precomputed features, and the prefill times the rest.
- On a shared CPU a timing is taken after other processes leave the CPU alone and re-run when they take more than a
  quarter of a core during it (`Clock`); CUDA timings use CUDA events.

Usage (from a script in this folder):
    parser = argparse.ArgumentParser(); common.add_model_arguments(parser); args = common.finish_model_arguments(parser.parse_args())
    llava, visor = common.build_models(args)
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import torch
import transformers
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from visor_hf import VisorForConditionalGeneration
from visor_hf.configuration_visor import TRANSFORMERS_V5
from visor_hf.modeling_visor import CACHE_FIELD as CACHE_KW  # the cache argument of both models' forward
IMAGE_TOKEN_ID = 151646  # LLaVA-OV's <image>
MiB = 2**20

# --------------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------------

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
SMOKE_TEXT = dict(QWEN2_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  max_position_embeddings=4096)
SMOKE_VISION = dict(TINY_VISION, hidden_size=32, intermediate_size=64, image_size=56)
SMOKE_IMAGE_TOKEN_ID = 500


def add_model_arguments(parser) -> None:
    """The flags that choose the models and where they run (every script takes them)."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                        help="attention implementation of both models (VISOR runs sdpa where flash is asked)")
    parser.add_argument("--language-model", default=DEFAULT_LANGUAGE_MODEL, choices=sorted(LANGUAGE_MODELS),
                        help=f"shapes of the language model (default {DEFAULT_LANGUAGE_MODEL}; qwen2-7b: about 50 GB "
                             "of GPU memory while the models are built in float32, 31 GB after)")
    parser.add_argument("--tiny-vision", action="store_true", help="a one-layer 64-wide vision tower (isolates the LLM)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (24 layers of width 64) and short runs: checks a script in seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --smoke)")
    parser.add_argument("--seed", type=int, default=0)


def finish_model_arguments(args):
    """Defaults that depend on other flags (the scripts' `main` sets torch's threads from `args.threads`)."""
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.smoke:
        args.threads = args.threads or 1  # two threads on a busy 2-core machine can run 10x slower
    return args


def llava_config(args) -> LlavaOnevisionConfig:
    """The LLaVA-OneVision config of the chosen shapes (anyres_max_9, 6 x 6 pinpoints, "full" features)."""
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
    return config


def build_models(args):
    """Dense LLaVA-OV with random weights and VISOR grafted onto the same weights, both in eval mode."""
    config = llava_config(args)
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
    """VISOR budgets from their command-line spelling; "auto" is skipped (with a note) without a routing token."""
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


def placeholder_inputs(input_ids: torch.Tensor, image_size, device, dtype) -> dict:
    """Model inputs around `input_ids` whose pixels only need to exist: the feature functions are patched
    (`precomputed_image_features`), so each prompt gets a 1 x 1 stand-in of its one image of `image_size`."""
    batch = input_ids.shape[0]
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "pixel_values": torch.zeros(batch, 1, 3, 1, 1, device=device, dtype=dtype),
            "image_sizes": torch.tensor([list(image_size)] * batch, device=device)}


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

    def summary(self) -> dict:
        """What the report says about the background load (JSON-ready)."""
        return {"cuda": self.cuda, "background": self.background, "reruns": self.rerun, "waited_s": self.waited,
                "max_background": self.max_background}

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
            return self._time_cuda(fn, setup)
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

    @staticmethod
    def _time_cuda(fn, setup):
        state = setup() if setup is not None else None
        call = fn if setup is None else (lambda: fn(state))
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = call()
        end.record()
        torch.cuda.synchronize()
        return result, start.elapsed_time(end) / 1000


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
# The stages every script runs
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
    """One prefill as `generate` runs it (cache on, lm_head on the last position): (next token, cache, S per sample)."""
    extra = {} if budget is None else {"budget": budget}
    out = model(**inputs, use_cache=True, logits_to_keep=1, **extra)
    return out.logits[:, -1:].argmax(-1), output_cache(out), getattr(out, "self_attn_layers", None)


def decode(model, token: torch.Tensor, cache, steps: int) -> None:
    """`steps` greedy decode steps from `cache` (grown in place)."""
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{CACHE_KW: cache})
        token, cache = out.logits[:, -1:].argmax(-1), output_cache(out)


# --------------------------------------------------------------------------------------------------
# Where and on what a run ran
# --------------------------------------------------------------------------------------------------


def code_version() -> str:
    """The commit the package was imported from, and whether the modeling file differs from it. VISOR_CODE_VERSION
    overrides it, for copies of the tree whose git metadata is not the code's (e.g. a tree sent to a GPU machine)."""
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
    """The machine and software line of a report."""
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    return (f"{device}, {torch.get_num_threads()} torch threads ({os.cpu_count()} cores visible), torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}, dtype {args.dtype}, "
            f"attention {args.attn}")


def run_tag(args) -> str:
    """Names a run's files and BENCHMARKS.md section: device, what differs from the default shapes, and "-compiled"
    for a run of compiled models (bench_prefill.py --compile), so that it never overwrites an eager run's."""
    compiled = ""
    if getattr(args, "compile", False):
        backend = getattr(args, "compile_backend", "inductor")
        compiled = "-compiled" + ("" if backend == "inductor" else "-" + backend)
    if args.smoke:
        return "smoke-" + args.device + compiled
    return (args.device + ("-tiny-vision" if args.tiny_vision else "")
            + ("" if args.language_model == DEFAULT_LANGUAGE_MODEL else "-" + args.language_model)
            + ("" if getattr(args, "batch_size", 1) == 1 else f"-batch{args.batch_size}") + compiled)


def shapes_text(args) -> str:
    if args.smoke:
        return "smoke shapes (24 tiny layers)"
    return (f"{LANGUAGE_MODELS[args.language_model][0]} language model + "
            + ("a one-layer 64-wide vision tower (--tiny-vision)" if args.tiny_vision
               else "SigLIP-400M (26 layers, 384 px, patch 14)"))


def write_json(path: Path, run: dict) -> None:
    """A run (its settings, machine and rows) as JSON: what `report.py` reads."""
    path.write_text(json.dumps(run, indent=1, default=str))
