"""Analytical FLOPs and KV-cache bytes of one prefill, for VISOR and for dense LLaVA-OneVision.

Convention (the same for every function here, and what `tests/test_flops.py` checks against
`torch.utils.flop_counter.FlopCounterMode` on models run with `attn_implementation="eager"`):

- 2 FLOPs per multiply-add of every matrix product: the q/k/v/o projections with grouped-query heads
  (k and v project to `num_key_value_heads * head_dim`), QK^T and AV per query head, the three SwiGLU
  matrices of the MLP, the lm_head, SigLIP's patch convolution, attention and two-matrix MLP, and the
  projector. Bias additions are not counted (neither does `FlopCounterMode` for `addmm`).
- No causal halving: attention scores are the full N x N (N queries x N keys) product, as eager attention
  and `FlopCounterMode` compute them.
- Element-wise work is excluded: RMSNorm/LayerNorm, rotary embeddings, softmax, activations, residual
  adds, the tanh gates, the anyres packing and its interpolation. They are a fraction of a percent.
- VISOR's CPE is a convolution and is counted: a depth-wise conv of kernel k over the visual tokens, 2 * k * H
  per visual token and cross-attention layer (breakdown key `cpe`), as `FlopCounterMode` counts the model's
  depth-wise convolution. Zero gaps the model inserts between two images sharing a row are not counted.
- lm_head: counted on `lm_head="last"` positions by default, the one position `generate` needs at prefill
  (`logits_to_keep=1` in both models). `lm_head="all"` counts every position of the dense sequence
  (N_v + N_t: both LLaVA-OneVision's and VISOR's `forward` return logits in the dense layout when
  `logits_to_keep=0`); `lm_head="none"` leaves it out (as FastV-style counts do).
- Token reduction (`token_reduction=`, with the image's `image_size`): the LLM is counted on the tokens that
  survive (exact, from LLaVA-OneVision's own anyres layout and the reduction's segments), and the selection's
  own matrix products join the vision encoder under `token_selection`: for pruning, QK^T of the scoring
  SigLIP layer on every crop (its q/k projections are the tower's own, captured) plus the cosine similarities (VisionZip's contextual merge,
  VisPruner's duplicate removal); for packing, its k*H -> H projection. The dense model gets the same
  reduction (what `baselines.TokenReducedLlavaOnevision` runs).
- Counts are per sample (batch size 1, no padding). The router MLP (budget "auto") is added with
  `router=True`: it reads every text token.

Where the work goes:

- Vision encoder = SigLIP (every layer of `vision_config`: LLaVA-OneVision runs them all and then picks a
  hidden state) plus the two-layer projector, on `num_crops` crops of `(image_size / patch_size)^2` tokens.
  The number of crops is not a function of the visual-token count (anyres unpads and adds newline tokens),
  so pass `num_crops` (`num_crops_for_image` gives it for an image size); by default it is
  `round(num_vision_tokens / tokens_per_crop)`, which is exact for anyres grids that need no unpadding
  (1,485 tokens = 2 crops; 7,371 = 10 crops) and for `crops * 729` token counts.
- Dense LLM: every layer runs on N = N_v + N_t tokens.
- VISOR LLM: a layer of the sample's configuration S runs on N_v + N_t tokens, every other layer on the N_t
  text tokens. Each cross-attention layer adds the q and o projections of the text, the k and v projections
  of the N_v visual tokens (computed once per prompt), QK^T and AV between N_t queries and N_v keys, and
  the CPE.

Usage:
    from visor_hf.flops import count_flops, kv_cache_bytes
    flops = count_flops(config, num_vision_tokens=2916, num_text_tokens=64, budget=2)
    flops["dense"]["llm"] / flops["visor"]["llm"]   # FLOPs ratio of the language model
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .configuration_visor import VisorConfig, num_video_tokens, num_visual_tokens, validate_token_reduction

LM_HEAD_CHOICES = ("last", "all", "none")


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------


def as_visor_config(config) -> VisorConfig:
    """A `VisorConfig` as is; a `LlavaOnevisionConfig` with VISOR's default placement (L/3 + L/3 layers)."""
    if isinstance(config, VisorConfig) or hasattr(config, "cross_attn_layers"):
        return config
    return VisorConfig.from_llava_onevision_config(config)


def resolve_configuration(config, budget) -> tuple[int, ...]:
    """The self-attention layers a fixed `budget` runs, with `VisorModel.resolve_budget`'s semantics.

    "full": all `self_attn_layers`; int k: the (first) configuration with k layers; a tuple: one of
    `config.configurations` (or all `self_attn_layers`). "auto" depends on the router: pass the configuration
    it chose (the model output's `self_attn_layers`).
    """
    if isinstance(budget, list):
        raise ValueError(f"budget={budget}: a list holds one budget per sample; count each sample (or use describe_cost)")
    configuration = as_visor_config(config).resolve_budget(budget)
    if configuration is None:
        raise ValueError(
            "budget='auto': the router picks the configuration per sample; pass the configuration it chose "
            "(e.g. budget=tuple(output.self_attn_layers[i])) or use describe_cost(..., self_attn_layers=...)"
        )
    return configuration


# --------------------------------------------------------------------------------------------------
# Building blocks (FLOPs of one sample)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextDims:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int

    @classmethod
    def of(cls, text_config) -> "TextDims":
        heads = text_config.num_attention_heads
        return cls(
            hidden=text_config.hidden_size,
            intermediate=text_config.intermediate_size,
            heads=heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
            vocab=text_config.vocab_size,
            layers=text_config.num_hidden_layers,
        )


def decoder_layer_flops(dims: TextDims, num_tokens: int) -> dict[str, int]:
    """One Qwen2 decoder layer on `num_tokens` tokens that attend to each other (full N x N scores)."""
    n, h, d = num_tokens, dims.hidden, dims.head_dim
    return {
        "attn_proj": 2 * n * h * (dims.heads * d) * 2 + 2 * n * h * (dims.kv_heads * d) * 2,  # q, o; k, v
        "attn_scores": 2 * 2 * dims.heads * n * n * d,  # QK^T and AV
        "mlp": 2 * n * h * dims.intermediate * 3,  # SwiGLU: gate, up, down
    }


def cross_attention_flops(dims: TextDims, num_text: int, num_visual: int, cpe_kernel_size: int) -> dict[str, int]:
    """One VISOR cross-attention: text queries (q, o), visual keys/values (k, v of CPE(V)), scores, CPE."""
    h, d = dims.hidden, dims.head_dim
    return {
        "cross_text_proj": 2 * num_text * h * (dims.heads * d) * 2,  # q and o
        "cross_visual_kv": 2 * num_visual * h * (dims.kv_heads * d) * 2,  # k and v, once per prompt
        "cross_scores": 2 * 2 * dims.heads * num_text * num_visual * d,
        "cpe": 2 * cpe_kernel_size * h * num_visual,
    }


def tokens_per_crop(config) -> int:
    """SigLIP's sequence length on one crop (what the vision encoder's FLOPs scale with)."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def num_crops_for_image(config, image_size) -> int:
    """Crops LLaVA-OneVision's anyres makes of one image of `image_size` (H, W): the grid plus the base crop."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    return int(image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, config.vision_config.image_size))


def default_num_crops(config, num_vision_tokens: int) -> int:
    """Crops for a visual-token count given without an image (benchmarks' N_v = 729, 2916, ...): the nearest
    whole number of crops. For an image, `num_crops_for_image` is exact."""
    if num_vision_tokens <= 0:
        return 0
    return max(1, round(num_vision_tokens / tokens_per_crop(config)))


def vision_encoder_flops(config, num_crops: int) -> dict[str, int]:
    """SigLIP (all layers) and the projector on `num_crops` crops."""
    vision = config.vision_config
    tokens = tokens_per_crop(config)
    hv, iv, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    channels = getattr(vision, "num_channels", 3)
    feature_layers = config.vision_feature_layer if isinstance(config.vision_feature_layer, list) else [0]
    projected = tokens - 1 if config.vision_feature_select_strategy == "default" else tokens  # "default" drops CLS
    hidden = config.text_config.hidden_size
    per_crop = {
        "patch_embed": 2 * tokens * hv * channels * patch * patch,
        "siglip_layers": vision.num_hidden_layers * (2 * tokens * hv * hv * 4 + 2 * 2 * tokens * tokens * hv + 2 * tokens * hv * iv * 2),
        "projector": 2 * projected * hv * len(feature_layers) * hidden + 2 * projected * hidden * hidden,
    }
    return {name: num_crops * value for name, value in per_crop.items()}


def _lm_head_positions(lm_head: str, num_tokens: int) -> int:
    if lm_head not in LM_HEAD_CHOICES:
        raise ValueError(f"lm_head={lm_head!r}: use one of {LM_HEAD_CHOICES}")
    return {"last": 1 if num_tokens else 0, "all": num_tokens, "none": 0}[lm_head]


def _add(total: dict[str, int], part: dict[str, int]) -> None:
    for name, value in part.items():
        total[name] = total.get(name, 0) + value


def _summary(vision: dict[str, int], llm: dict[str, int]) -> dict:
    vision_total, llm_total = sum(vision.values()), sum(llm.values())
    return {
        "vision_encoder": vision_total, "llm": llm_total, "total": vision_total + llm_total,
        "breakdown": {**vision, **llm},
    }


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def token_reduction_counts(config, image_size, token_reduction) -> dict:
    """Visual tokens of one image before and after `token_reduction`, and the selection's FLOPs.

    Returns {"num_vision_tokens": N_v, "kept": N_v', "num_crops": crops, "selection": FLOPs (int)}. N_v is the
    package's one count (`configuration_visor.num_visual_tokens`); the kept tokens follow
    `modeling_visor.reduce_image_tokens` exactly (newlines kept, ceil(n * keep_ratio) per segment), on the segments
    of the model's per-token layout (`image_token_layout`)."""
    config = as_visor_config(config)
    setting = validate_token_reduction(token_reduction)
    total, crops = num_visual_tokens(config, image_size), num_crops_for_image(config, image_size)
    if setting is None:
        return {"num_vision_tokens": total, "kept": total, "num_crops": crops, "selection": 0}
    from .modeling_visor import image_token_layout, reduction_segments  # only reduction needs the token layout

    (is_newline, _, base_length), = image_token_layout(config, [image_size])
    if is_newline.shape[0] != total:  # both follow LLaVA-OneVision's packing: a difference is a bug, not bad input
        raise RuntimeError(f"image {tuple(image_size)}: the token layout has {is_newline.shape[0]} tokens, "
                         f"num_visual_tokens counts {total}")
    hidden = config.text_config.hidden_size
    kept, selection = int(is_newline.sum()), 0
    for segment in reduction_segments(is_newline, base_length, setting["method"]):
        n = segment.numel()
        if setting["method"] == "pack":
            groups = -(-n // setting["pack_factor"])
            kept, selection = kept + groups, selection + 2 * groups * setting["pack_factor"] * hidden * hidden
            continue
        keep = math.ceil(n * setting["keep_ratio"])
        kept += keep
        selection += (_visionzip_flops if setting["method"] == "visionzip" else _vispruner_flops)(n, keep, setting, hidden)
    if setting["method"] != "pack":  # the scoring layer's QK^T again on every crop (its kernel returns no weights)
        tokens, width = tokens_per_crop(config), config.vision_config.hidden_size
        selection += crops * 2 * tokens * tokens * width
    return {"num_vision_tokens": total, "kept": kept, "num_crops": crops, "selection": selection}


def _visionzip_flops(n: int, keep: int, setting: dict, hidden: int) -> int:
    """Cosine similarities of the merged tokens to the contextual targets (`select_visionzip`)."""
    dominant = keep if keep < 2 else max(1, round(keep * setting["dominant_fraction"]))
    context, rest = keep - dominant, n - dominant
    if context <= 0 or rest <= 0:
        return 0
    stride = max(1, rest // context)
    targets = min(context, -(-rest // stride))
    return 2 * rest * targets * hidden


def _vispruner_flops(n: int, keep: int, setting: dict, hidden: int) -> int:
    """Cosine similarities of the duplicate-removal rounds (`select_vispruner`), replayed on sizes."""
    important = min(keep, int(keep * setting["important_fraction"]))
    rest, diverse, flops = n - important, keep - important, 0
    while rest > diverse:
        a, b = -(-rest // 2), rest // 2
        if b == 0:
            break
        flops += 2 * a * b * hidden
        rest -= min(8, rest - diverse, a)
    return flops


def keep_ratio_for_flops(config, image_size, num_text_tokens: int, method: str, target_llm_flops: float, **setting) -> float:
    """The smallest keep ratio at which dense LLaVA-OneVision + pruning `method` costs at least `target_llm_flops`
    LLM FLOPs: dense + pruning matched to a VISOR configuration. Returns 1.0 if even no pruning costs less; a
    target below what the always-kept newline tokens cost gives the smallest ratio tried (1e-4)."""
    if method not in ("visionzip", "vispruner"):
        raise ValueError(f"keep_ratio_for_flops: method={method!r}; allowed: 'visionzip', 'vispruner' (dense "
                         "LLaVA-OneVision has no packing layer)")
    num_visual = num_visual_tokens(config, image_size)

    def llm(ratio: float) -> float:
        reduction = {"method": method, "keep_ratio": ratio, **setting}
        return count_flops(config, num_visual, num_text_tokens, "full", token_reduction=reduction, image_size=image_size)["dense"]["llm"]

    low, high = 1e-4, 1.0
    if llm(high) <= target_llm_flops:
        return 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if llm(middle) < target_llm_flops else (low, middle)
    return high


def count_flops(
    config, num_vision_tokens: int, num_text_tokens: int, budget="full", num_crops: int | None = None,
    lm_head: str = "last", router: bool = False, token_reduction=None, image_size=None,
) -> dict:
    """FLOPs of one prefill of one sample, VISOR and dense LLaVA-OneVision (convention: module docstring).

    Args:
        config: a `VisorConfig` (or a `LlavaOnevisionConfig`, which gets VISOR's default placement).
        num_vision_tokens: N_v, visual tokens after anyres packing (what the image placeholders count).
        num_text_tokens: N_t, the other tokens of the prompt.
        budget: "full", an int k, or a tuple of layers (one of `config.configurations`), as the model takes.
        num_crops: crops the vision encoder runs on; default: the anyres crops of `image_size` if given, else
            `round(N_v / tokens_per_crop)`.
        lm_head: "last" (default), "all" or "none": positions the lm_head is counted on.
        router: add the router MLP (what budget="auto" runs, on every text token).
        token_reduction: a token-reduction setting (`VisorConfig.token_reduction`'s form); needs `image_size`.
            Both models are counted on the surviving tokens, plus the selection (breakdown `token_selection`).
        image_size: (height, width) of the one image, which fixes the anyres layout the reduction works on.

    Returns:
        {"visor": {...}, "dense": {...}, "self_attn_layers": S, "flops_ratio": dense / visor (LLM),
        "num_vision_tokens_kept": N_v after token reduction (N_v without)} where each model entry holds
        "vision_encoder", "llm", "total" and a "breakdown" by part. `token_reduction=None` means no reduction here
        (`describe_cost`, which mirrors a model call, falls back to `config.token_reduction`).
    """
    config = as_visor_config(config)
    dims = TextDims.of(config.text_config)
    configuration = resolve_configuration(config, budget)
    num_visual, num_text = int(num_vision_tokens), int(num_text_tokens)
    if image_size is not None and num_crops is None and num_visual:
        num_crops = num_crops_for_image(config, image_size)
    num_crops = default_num_crops(config, num_visual) if num_crops is None else num_crops
    selection = 0
    token_reduction = validate_token_reduction(token_reduction)
    if token_reduction is not None and num_visual:
        if image_size is None:
            raise ValueError("count_flops(token_reduction=...) needs image_size=(height, width): the anyres layout "
                             "decides how many tokens each segment keeps")
        counts = token_reduction_counts(config, image_size, token_reduction)
        if counts["num_vision_tokens"] != num_visual:
            raise ValueError(f"num_vision_tokens={num_visual} (the count before reduction), but an image of "
                             f"{tuple(image_size)} has {counts['num_vision_tokens']} visual tokens")
        num_visual, selection = counts["kept"], counts["selection"]
    num_tokens = num_visual + num_text
    vision = vision_encoder_flops(config, num_crops) if num_visual else {}
    if selection:
        vision["token_selection"] = selection
    head = {"lm_head": 2 * _lm_head_positions(lm_head, num_tokens) * dims.hidden * dims.vocab}

    dense: dict[str, int] = {}
    for _ in range(dims.layers):
        _add(dense, decoder_layer_flops(dims, num_tokens))
    _add(dense, head)

    visor: dict[str, int] = {}
    for layer in range(dims.layers):
        runs_visual = layer in configuration and num_visual > 0
        _add(visor, decoder_layer_flops(dims, num_tokens if runs_visual else num_text))
        if layer in config.cross_attn_layers and num_visual > 0:
            _add(visor, cross_attention_flops(dims, num_text, num_visual, config.cpe_kernel_size))
    _add(visor, head)
    if router:
        visor["router"] = 2 * num_text * (dims.hidden * config.router_hidden_size + config.router_hidden_size * len(config.configurations))

    result = {"visor": _summary(vision, visor), "dense": _summary(vision, dense), "self_attn_layers": configuration,
              "num_vision_tokens_kept": num_visual}
    result["flops_ratio"] = result["dense"]["llm"] / max(1, result["visor"]["llm"])
    return result


def fastv_style_flops(config, num_vision_tokens: int, num_text_tokens: int, budget="full") -> dict[str, float]:
    """The language-model count token-reduction papers quote, for dense and for VISOR's configuration.

    FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2", sec. 4) counts a layer on n
    tokens as 4nd^2 + 2n^2d + 2ndm (d hidden size, m FFN size) and the model as the sum over layers; DivPrune's
    `tflops.py` uses the same T * (4nd^2 + 2n^2d + 2ndm) (see shared/notes/token-reduction.md, sec. 5). Read
    literally, that is one FLOP per multiply-add, multi-head attention with full-size k/v projections, a
    two-matrix FFN and no lm_head or vision encoder, so it is roughly half of `count_flops`' LLM figure.
    VISOR's cross-attention layers are counted in the same convention: 2*N_t*d^2 (q, o) + 2*N_v*d^2 (k, v) +
    2*N_t*N_v*d (scores); the CPE is left out.
    """
    config = as_visor_config(config)
    d, m = config.text_config.hidden_size, config.text_config.intermediate_size
    configuration = resolve_configuration(config, budget)
    num_visual, num_text = int(num_vision_tokens), int(num_text_tokens)

    def layer(n: int) -> float:
        return 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m

    layers = config.text_config.num_hidden_layers
    dense = layers * layer(num_visual + num_text)
    visor = sum(layer(num_visual + num_text if i in configuration and num_visual else num_text) for i in range(layers))
    if num_visual:
        cross = 2 * num_text * d**2 + 2 * num_visual * d**2 + 2 * num_text * num_visual * d
        visor += len(config.cross_attn_layers) * cross
    return {"dense": dense, "visor": visor, "flops_ratio": dense / max(1, visor)}


def dtype_bytes(dtype) -> int:
    """Bytes of one element of a torch dtype or its name ("bfloat16", "float32", ...)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(config, num_vision_tokens: int, num_text_tokens: int, budget="full", dtype=torch.bfloat16) -> dict:
    """Bytes of the keys and values cached after the prefill of one sample, VISOR and dense.

    Dense: every layer caches N_v + N_t tokens. VISOR (DESIGN.md): a text-only layer caches the N_t text tokens,
    a layer of the configuration S caches N_v + N_t, and each cross-attention layer caches the keys/values of
    the N_v visual tokens once. So VISOR's visual part is (|S| + |C|) / L of dense's and the text part equal.
    Each entry: {"visual", "text", "total"} in bytes; grows by `per_token_per_layer` * L per decoded token.
    """
    config = as_visor_config(config)
    dims = TextDims.of(config.text_config)
    configuration = resolve_configuration(config, budget)
    per_token = 2 * dims.kv_heads * dims.head_dim * dtype_bytes(dtype)  # keys + values of one token in one layer
    num_visual, num_text = int(num_vision_tokens), int(num_text_tokens)
    visual_layers = (len(configuration) + len(config.cross_attn_layers)) if num_visual else 0

    def entry(visual_token_layers: int) -> dict[str, int]:
        visual, text = per_token * visual_token_layers, per_token * num_text * dims.layers
        return {"visual": visual, "text": text, "total": visual + text}

    return {
        "visor": entry(num_visual * visual_layers), "dense": entry(num_visual * dims.layers),
        "self_attn_layers": configuration, "per_token_per_layer": per_token,
    }


def cache_nbytes(cache) -> dict[str, int]:
    """Bytes of keys and values a filled cache holds (a `DynamicCache`, or a `VisorCache` with its per-group layers in
    `cache.row_groups` and its cross-attention keys/values in `cache.prompt`): {"layers", "cross_attn", "total"}. The measured counterpart of `kv_cache_bytes`."""

    def nbytes(tensor) -> int:
        return 0 if tensor is None else tensor.numel() * tensor.element_size()

    layers = sum(nbytes(getattr(layer, "keys", None)) + nbytes(getattr(layer, "values", None)) for layer in cache.layers)
    # a VisorCache's layers that the samples of a batch ran differently keep one cache per group of samples
    groups = [group for groups in getattr(cache, "row_groups", {}).values() for group in groups]
    layers += sum(nbytes(group.keys) + nbytes(group.values) for group in groups)
    prompt = getattr(cache, "prompt", None)
    cross = sum(nbytes(k) + nbytes(v) for k, v in prompt.cross_key_values.values()) if prompt is not None else 0
    return {"layers": layers, "cross_attn": cross, "total": layers + cross}


# --------------------------------------------------------------------------------------------------
# What a call cost
# --------------------------------------------------------------------------------------------------


@dataclass
class SampleCost:
    """FLOPs of one sample's prefill as it would run alone (no padding)."""

    self_attn_layers: tuple[int, ...]
    num_vision_tokens: int
    num_text_tokens: int
    num_crops: int
    visor: dict
    dense: dict
    num_vision_tokens_kept: int | None = None  # after token reduction (None: no reduction)

    @property
    def llm_ratio(self) -> float:
        """Dense / VISOR FLOPs of the language model."""
        return self.dense["llm"] / max(1, self.visor["llm"])

    @property
    def total_ratio(self) -> float:
        """Dense / VISOR FLOPs including the (shared) vision encoder."""
        return self.dense["total"] / max(1, self.visor["total"])


def _kept(sample: SampleCost) -> str:
    kept = sample.num_vision_tokens_kept
    return str(sample.num_vision_tokens) if kept in (None, sample.num_vision_tokens) else f"{sample.num_vision_tokens} -> {kept}"


@dataclass
class CostReport:
    samples: list[SampleCost]

    def __str__(self) -> str:
        lines = [
            "sample | self-attention layers | N_v | N_t | crops | VISOR LLM GFLOPs | dense LLM GFLOPs | LLM ratio (x fewer than "
            "dense) | total ratio (x fewer than dense)",
            "--- | --- | --- | --- | --- | --- | --- | --- | ---",
        ]
        for i, s in enumerate(self.samples):
            lines.append(
                f"{i} | {s.self_attn_layers} | {_kept(s)} | {s.num_text_tokens} | {s.num_crops} | "
                f"{s.visor['llm'] / 1e9:.4g} | {s.dense['llm'] / 1e9:.4g} | {s.llm_ratio:.1f}x | {s.total_ratio:.1f}x"
            )
        return "\n".join(lines)


def describe_cost(
    model_or_config, inputs: dict, budget=None, self_attn_layers=None, lm_head: str = "last", token_reduction=None
) -> CostReport:
    """Per-sample configuration and FLOPs relative to dense LLaVA-OneVision for a VISOR call.

    Ratios are "N x fewer than dense": dense FLOPs / VISOR FLOPs (`SampleCost.llm_ratio`, `total_ratio`), the one
    direction of every FLOPs ratio in the package (`count_flops`' "flops_ratio", the benchmark tables, the demo).

    `inputs` are the model's inputs (input_ids, attention_mask, image_sizes, batch_num_images as LLaVA-OV takes
    them). Pass the `self_attn_layers` of the output (`model(**inputs, budget=...)` returns one tuple per sample)
    to report what ran, which is required for budget="auto" (its router cost is then added); otherwise the
    configuration comes from `budget` (a fixed budget or a list with one per sample; default
    `config.default_budget`). Each sample is counted as it would run alone, which is what a batch mixing
    configurations costs (each group of samples runs a layer as what it is), padding aside.
    With token reduction (`token_reduction`, the setting of the call; None: `config.token_reduction`, as the model
    does), each sample is counted on its surviving visual tokens, the selection included; that needs one image
    per sample (its size fixes the layout). `token_reduction="none"` counts without reduction.
    """
    config = as_visor_config(getattr(model_or_config, "config", model_or_config))
    input_ids = inputs["input_ids"]
    batch = input_ids.shape[0]
    attention_mask = inputs.get("attention_mask")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_video = (input_ids == config.video_token_id) & valid
    is_visual = ((input_ids == config.image_token_id) & valid) | is_video
    budget = config.default_budget if budget is None else budget
    budgets = budget if isinstance(budget, list) else [budget] * batch
    if len(budgets) != batch:
        raise ValueError(f"budget is a list of {len(budgets)} entries for a batch of {batch} samples")
    if self_attn_layers is not None and len(self_attn_layers) != batch:
        raise ValueError(f"self_attn_layers has {len(self_attn_layers)} entries for a batch of {batch} samples")

    if token_reduction is None:  # as the model's forward: None means the config's default
        token_reduction = config.token_reduction
    token_reduction = validate_token_reduction(token_reduction)
    if token_reduction is not None and bool(is_video.any()):
        raise ValueError("token reduction applies to images only; count videos with token_reduction='none'")
    has_image = [bool((is_visual[b] & ~is_video[b]).any()) for b in range(batch)]
    crops = [images + frames for images, frames in zip(_crops_per_sample(config, inputs, has_image),
                                                       _video_frames_per_sample(config, inputs, is_video))]
    samples = []
    for b in range(batch):
        num_visual, num_text = int(is_visual[b].sum()), int((valid[b] & ~is_visual[b]).sum())
        configuration = tuple(self_attn_layers[b]) if self_attn_layers is not None else budgets[b]
        image_size = None
        if token_reduction is not None and num_visual:
            per_sample = inputs.get("batch_num_images")
            if per_sample is not None and int(per_sample[b]) != 1:
                raise ValueError(f"describe_cost with token reduction counts samples with one image each; sample {b} "
                                 f"has {int(per_sample[b])}")
            first = int(sum(per_sample[:b])) if per_sample is not None else sum(bool(is_visual[i].any()) for i in range(b))
            image_size = [int(x) for x in inputs["image_sizes"][first]]
        flops = count_flops(
            config, num_visual, num_text, budget=configuration, num_crops=crops[b] if num_visual else 0,
            lm_head=lm_head, router=budgets[b] == "auto", token_reduction=token_reduction if num_visual else None,
            image_size=image_size,
        )
        kept = flops["num_vision_tokens_kept"] if token_reduction is not None else None
        samples.append(SampleCost(flops["self_attn_layers"], num_visual, num_text, crops[b], flops["visor"], flops["dense"], kept))
    return CostReport(samples)


def _video_frames_per_sample(config, inputs: dict, is_video: torch.Tensor) -> list[int]:
    """Frames the vision encoder runs on per sample (each frame is one crop): a sample's video placeholders over
    `num_video_tokens` of the batch's frame count give its number of videos."""
    videos = inputs.get("pixel_values_videos")
    if videos is None:
        return [0] * is_video.shape[0]
    frames = int(videos.shape[1])
    per_video = num_video_tokens(config, frames)
    return [int(is_video[b].sum()) // per_video * frames for b in range(is_video.shape[0])]


def _crops_per_sample(config, inputs: dict, has_image: list[bool]) -> list[int]:
    """Crops the vision encoder runs on per sample, as LLaVA-OneVision's `get_image_features` decides them:
    anyres crops for a sample with one image, one crop per image for a sample with several. Without
    `batch_num_images`, images go one each to the samples holding image placeholders, in order."""
    image_sizes = inputs.get("image_sizes")
    if image_sizes is None or inputs.get("pixel_values") is None:
        return [0] * len(has_image)
    image_sizes = [tuple(int(x) for x in size) for size in image_sizes]
    if inputs.get("batch_num_images") is not None:
        images_per_sample = [int(n) for n in inputs["batch_num_images"]]
    else:
        images_per_sample = [int(h) for h in has_image]
    if sum(images_per_sample) > len(image_sizes):
        raise ValueError(f"{sum(images_per_sample)} images expected from the prompts, {len(image_sizes)} image_sizes given")
    crops, start = [], 0
    for count in images_per_sample:
        sizes = image_sizes[start : start + count]
        crops.append(num_crops_for_image(config, sizes[0]) if count == 1 else count)
        start += count
    return crops


__all__ = [
    "count_flops", "token_reduction_counts", "keep_ratio_for_flops", "fastv_style_flops", "kv_cache_bytes", "cache_nbytes", "describe_cost", "resolve_configuration",
    "num_crops_for_image", "vision_encoder_flops", "CostReport", "SampleCost",
]
