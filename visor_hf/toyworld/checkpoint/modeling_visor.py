"""VISOR (VISion On Request, Bulat et al., CVPR 2026) on top of LLaVA-OneVision.

The vision tower, projector, anyres packing and every language-model layer are LLaVA-OneVision's own
(`VisorModel` subclasses transformers' `LlavaOnevisionModel`, so the checkpoint keys are unchanged).
What VISOR changes is which tokens each language-model layer sees:

    V = visual tokens (never pruned), T = text tokens, in the dense sequence's order and RoPE positions
    for layer l:
        if l in the sample's self-attention configuration S:  [V; T] = Layer_l([V; T])   (dense order)
        else:                                                  T      = Layer_l(T)        (text only)
        if l in config.cross_attn_layers:                      T      = T + tanh(g_l) * XAttn_l(T, CPE_l(V))

How a forward call reads (`VisorModel.forward`): build the prompt (`build_prompt`: embeddings, visual features,
optional token reduction) -> split it into a text and a visual stream and set up the prompt state (`split_prompt`) ->
for each layer one `layer_step`, shared by prefill and decode -> norm. A decoding step enters the same loop with its
new tokens as the text stream (`decode_streams`).

Design choices:
- The language model's layers are called through their own forward (module call), so hooks on them work as for
  LLaVA-OneVision: accelerate's device placement and CPU/disk offload, PEFT, quantized linears, gradient
  checkpointing, FSDP wrapping `Qwen2DecoderLayer`. VISOR's masks and cache reach the layer's attention through
  transformers' attention interface: each layer's attention sees a `VisorLayerConfig` that names `visor_attention`,
  while the text config keeps naming the kernel ("sdpa", "eager").
- Text stream and visual stream. The prompt is split once into a left-padded text stream (B, Nt) and a right-padded
  visual stream (B, Nv), both in the dense order. A self-attention layer runs on both put back in the dense layout;
  text-only layers never touch visual tokens.
- Masks are boolean, True = may attend; None where SDPA's own causal / no-mask kernel serves. A row with no allowed
  key (padding, text before the first image in cross-attention) returns zeros instead of NaN. `VisorPromptState`
  answers which mask a layer needs; which layers run is decided on the host, once per prompt.
- A sample pays for what it runs. At a layer that some samples of a batch run on [V; T] and others skip, each group
  runs as what it is (`split_layer_step`: the dense layer on the one sub-batch, the text-only layer on the other) and
  keeps a cache of its own (`RowGroupCache`), so each sample gets exactly what it gets alone, at its own cost.
- One cache object (`VisorCache`, a `DynamicCache`) indexed by layer: text-only layers cache text keys and values,
  self-attention layers cache visual + text (per group where the samples differ), and the cross-attention
  keys/values of the visual tokens are computed once at prefill and kept in its `prompt` state. Decoding never
  touches visual tokens outside S and C. `VisorCache(max_cache_len=N)` (what `generate(cache_implementation=
  "static")` makes) preallocates every layer after the prefill, so a decoding step has fixed shapes and no host sync
  and compiles whole (`torch.compile(fullgraph=True)`, CUDA graphs).
- Videos (`pixel_values_videos`) are LLaVA-OneVision's: each frame through the tower, pooled 2 x 2, one newline
  token after the last frame. A video is one item of the visual stream, like an image: its frames' tokens, in order,
  are one sequence for the CPE (which convolves across frame boundaries, as over an image's rows), and text placed
  after it reads all of it through cross-attention.
- New parts start as identity (zero gates, zero CPE convolution), so a freshly grafted model at the full budget with
  all layers in S is LLaVA-OneVision exactly. `new_parameters()` names them; `init_new_parameters()` is their one
  initialisation.

Usage:
    model = VisorForConditionalGeneration.from_llava_onevision(llava_model)
    out = model.generate(**inputs, budget=2, max_new_tokens=32)
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, DynamicCache, GenerationMixin
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    LlavaOnevisionPreTrainedModel,
    image_size_to_num_patches,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm
from transformers.utils import ModelOutput

from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

from .configuration_visor import (
    HUB_CODE_FILES,
    TRANSFORMERS_V5,
    VisorConfig,
    is_generic_model_card,
    model_card_text,
    validate_token_reduction,
)

# The keyword that carries the cache into transformers' layers and generate(): `cache` in recent 5.x releases,
# `past_key_values` in 4.57 and early 5.x (5.19 still); read from the layer's own signature, not the version number.
CACHE_FIELD = "cache" if "cache" in inspect.signature(Qwen2DecoderLayer.forward).parameters else "past_key_values"

try:  # transformers >= 5 initialises through wrappers that respect already-loaded weights
    from transformers import initialization as _init
except ImportError:  # transformers 4.57
    _init = nn.init


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def attend(query, key, value, allowed, implementation: str, scaling: float) -> torch.Tensor:
    """Grouped-query attention with a boolean mask.

    query (B, h, Q, d); key/value (B, kvh, K, d); allowed (B, 1, Q, K), True = may attend, or None when nothing
    is padding: the Q queries are the last Q of the K keys, each reads the keys up to itself. Then SDPA needs no
    mask tensor (Q == K: its causal kernel; Q == 1, a decoding step: every key), its fastest kernels.
    Returns (B, Q, h, d). Rows with no allowed key return zeros.
    """
    groups = query.shape[1] // key.shape[1]
    num_queries, num_keys = query.shape[2], key.shape[2]
    if allowed is None:
        if num_queries > num_keys:
            raise ValueError(f"a causal mask needs at most as many queries as keys, got {num_queries} and {num_keys}")
        if implementation != "eager" and num_queries in (1, num_keys):
            # is_causal must be a plain bool: compiled with dynamic shapes, `num_queries > 1` is symbolic, and branching on
            # it in Python specialises it (a guard) where passing it to SDPA would break the graph
            causal = True if num_queries > 1 else False
            out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scaling, enable_gqa=groups > 1)
            return out.transpose(1, 2)
        allowed = torch.ones(num_queries, num_keys, dtype=torch.bool, device=query.device)
        allowed = allowed.tril(num_keys - num_queries)[None, None]
    has_key = allowed.any(dim=-1, keepdim=True)  # (B, 1, Q, 1)
    allowed = allowed | ~has_key  # a fully masked row would give NaN; it is zeroed below
    if implementation == "eager":
        key = key.repeat_interleave(groups, dim=1)  # (B, h, K, d)
        value = value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value)
    else:  # "sdpa"; flash-attention checkpoints fall back to it (masks here are not plain causal)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=groups > 1)
    out = out * has_key.to(out.dtype)
    return out.transpose(1, 2)


def causal_allowed(key_valid: torch.Tensor, num_queries: int, first_query=None) -> torch.Tensor:
    """(B, K) key validity -> (B, 1, Q, K) mask where query q is key `first_query + q` and reads the keys up to itself.
    `first_query` defaults to K - Q (the queries are the last Q keys); a static cache passes a tensor."""
    num_keys = key_valid.shape[1]
    first_query = num_keys - num_queries if first_query is None else first_query
    q = torch.arange(num_queries, device=key_valid.device)[:, None] + first_query
    k = torch.arange(num_keys, device=key_valid.device)[None, :]
    return (k <= q)[None, None] & key_valid[:, None, None, :]


# The language model's own layers run VISOR's masks through transformers' attention interface: each layer's attention
# looks up its function by `config._attn_implementation`, so its config names this one (see `VisorLayerConfig`).
# One name per copy of this module: a process can hold the package's copy and a Hub checkpoint's (trust_remote_code),
# and each copy's layers must call their own attention function (the registry is global; its types are per copy).
VISOR_ATTENTION = f"visor[{__name__}]"


def visor_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The attention function of the language-model layers: `attend` with VISOR's boolean mask (or None), on the kernel
    the text config names ("sdpa" or "eager"; flash-attention checkpoints run SDPA, as VISOR's masks are not plain
    causal). Returns (B, Q, h, d) and no weights, as transformers' attention functions do. Keys given as
    `GroupedKeyValues` (a decoding step of a layer the samples ran differently): each group attends to its own keys."""
    kernel = module.config.text_config._attn_implementation or "sdpa"
    scaling = module.scaling if scaling is None else scaling
    if isinstance(key, GroupedKeyValues):
        out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])  # (B, Q, h, d)
        for rows, group_key, group_value, mask in zip(key.rows, key.keys, key.values, key.masks):
            out = out.index_copy(0, rows, attend(query.index_select(0, rows), group_key, group_value, mask, kernel, scaling))
        return out, None
    return attend(query, key, value, attention_mask, kernel, scaling), None


@dataclass
class GroupedKeyValues:
    """The cached keys/values of one layer held per group of samples (`RowGroupCache`), with each group's rows and
    mask: what `RowGroupsStep.update` hands a layer's attention in place of one key and one value tensor."""

    rows: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    masks: list[torch.Tensor | None]


AttentionInterface.register(VISOR_ATTENTION, visor_attention)


class VisorLayerConfig:
    """The config a language-model layer's attention reads: the text config itself, except that `_attn_implementation`
    names VISOR's attention function. The text config keeps naming the kernel ("sdpa", "eager"), so what users and
    transformers set there (`attn_implementation=`, `set_attn_implementation`) still chooses it."""

    _attn_implementation = VISOR_ATTENTION

    def __init__(self, text_config):
        self.text_config = text_config

    def __getattr__(self, name):  # only called for attributes not found above: they are the text config's
        if name.startswith("__") or name == "text_config":  # copy/pickle probe before __init__ ran
            raise AttributeError(name)
        return getattr(self.text_config, name)


# --------------------------------------------------------------------------------------------------
# VISOR's new modules
# --------------------------------------------------------------------------------------------------


def item_starts(image_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) image ids, -1 where no image or video -> (B, N) True at the first token of each item's run."""
    return (image_ids >= 0) & (image_ids != F.pad(image_ids, (1, 0), value=-1)[:, :-1])


@dataclass
class VisualLayout:
    """Where the images sit in a (B, N) visual buffer. Computed once per prompt and shared by every CPE, so that the
    cross-attention layers need not ask the GPU for it (a host sync) one by one."""

    rank: torch.Tensor  # (B, N) which image of its row a token belongs to (0 for padding)
    all_valid: bool  # no padding in the buffer
    gaps: int  # the most images in one row, less one

    @classmethod
    def of(cls, image_ids: torch.Tensor, all_valid: bool | None = None, gaps: int | None = None) -> "VisualLayout":
        """image_ids (B, N), -1 for padding. `all_valid` and `gaps`, if the caller knows them (`VisorModel.split_prompt`
        reads them with the prompt's sizes), else read here in one host sync."""
        valid = image_ids >= 0
        rank = (torch.cumsum(item_starts(image_ids).long(), dim=1) - 1).clamp(min=0)
        if not rank.numel():
            return cls(rank, True, 0)
        if all_valid is None or gaps is None:
            all_valid, gaps = torch.stack([valid.all().long(), rank.max()]).tolist()
        return cls(rank, bool(all_valid), gaps)

    def to(self, device) -> "VisualLayout":
        """On `device` (accelerate's hooks move a module's inputs with `.to`, e.g. layers split over several GPUs)."""
        return VisualLayout(self.rank.to(device), self.all_valid, self.gaps)


class VisorCPE(nn.Module):
    """Conditional positional encoding `x + DWConv1d(x)` run over each image's own token sequence.

    The depth-wise convolution (kernel k, padding k // 2) never mixes tokens of two images, two samples or
    padding: a neighbour counts only if it carries the same image id. Starts as identity (zero weights).
    """

    def __init__(self, hidden_size: int, kernel_size: int):
        super().__init__()
        # The weights of nn.Conv1d(H, H, k, padding=k // 2, groups=H), held directly so that no generic
        # initialisation of convolutions touches them.
        self.weight = nn.Parameter(torch.zeros(hidden_size, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor, image_ids: torch.Tensor, layout: VisualLayout | None = None) -> torch.Tensor:
        """x (B, N, H); image_ids (B, N), -1 for padding; `layout` of image_ids if known. Returns (B, N, H)
        (padding rows unspecified)."""
        half = self.weight.shape[-1] // 2
        layout = layout or VisualLayout.of(image_ids)
        rank, gaps = layout.rank, layout.gaps
        # padding contributes zeros
        source = x if layout.all_valid else x * (image_ids >= 0).unsqueeze(-1).to(x.dtype)
        # Images that share a row are pulled apart by `half` zero tokens, so that one convolution over the row
        # never reaches from one image into the next. Rows of one image need no gaps.
        if gaps:
            position = (torch.arange(x.shape[1], device=x.device) + half * rank).unsqueeze(-1).expand_as(x)
            source = x.new_zeros(x.shape[0], x.shape[1] + half * gaps, x.shape[2]).scatter(1, position, source)
        # The depth-wise conv1d, run as a conv2d over a (B, H, 1, N) view of the (B, N, H) tokens. That view is
        # channels-last, which the CPU conv2d kernel takes as it is (about 10x faster at N = 2,916, H = 896 than
        # F.conv1d, which copies to channels-first); the arithmetic is the same.
        conv = F.conv2d(
            source.transpose(1, 2).unsqueeze(2), self.weight.to(x.dtype).unsqueeze(2), self.bias.to(x.dtype),
            padding=(0, half), groups=x.shape[-1],
        ).squeeze(2).transpose(1, 2)
        if gaps:
            conv = conv.gather(1, position)
        return x + conv


class VisorCrossAttention(nn.Module):
    """Gated cross-attention: text queries read visual keys/values. Grouped-query heads, no rotary.

    At prefill `forward` gets the visual tokens and computes their keys/values (of CPE(V)); at each later step it gets
    those keys/values back from the cache. Both happen inside `forward`, so that hooks on the module (accelerate's
    device placement and offload) see every use of its weights.
    """

    def __init__(self, text_config, cpe_kernel_size: int):
        super().__init__()
        hidden = text_config.hidden_size
        self.num_heads = text_config.num_attention_heads
        self.num_key_value_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or hidden // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.cpe = VisorCPE(hidden, cpe_kernel_size)
        self.visual_norm = Qwen2RMSNorm(hidden, eps=text_config.rms_norm_eps)
        self.text_norm = Qwen2RMSNorm(hidden, eps=text_config.rms_norm_eps)
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))

    def visual_key_values(self, visual: torch.Tensor, image_ids: torch.Tensor, layout: VisualLayout | None = None):
        """visual (B, Nv, H) -> keys, values (B, kvh, Nv, d) of CPE(V); `layout`: VisualLayout.of(image_ids)."""
        batch, length, _ = visual.shape
        visual = self.visual_norm(self.cpe(visual, image_ids, layout))
        shape = (batch, length, self.num_key_value_heads, self.head_dim)
        return self.k_proj(visual).view(shape).transpose(1, 2), self.v_proj(visual).view(shape).transpose(1, 2)

    def forward(self, text, allowed, implementation: str, key_values=None, visual=None, image_ids=None, layout=None):
        """text (B, Q, H); allowed (B, 1, Q, Nv), or None for one query reading every visual token (a decoding step
        without padding). Either `visual` (B, Nv, H) with its `image_ids` (B, Nv) and `layout` (prefill), or the
        `key_values` that call returned. Returns the updated text and the visual keys/values."""
        if visual is not None:
            key_values = self.visual_key_values(visual, image_ids, layout)
        batch, length, _ = text.shape
        query = self.q_proj(self.text_norm(text)).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        out = attend(query, *key_values, allowed, implementation, self.scaling).reshape(batch, length, -1)
        return text + torch.tanh(self.gate).to(text.dtype) * self.o_proj(out), key_values


class VisorRouter(nn.Module):
    """MLP that reads the routing token's hidden state and scores `config.configurations`."""

    def __init__(self, hidden_size: int, router_hidden_size: int, num_configurations: int, eps: float):
        super().__init__()
        self.norm = Qwen2RMSNorm(hidden_size, eps=eps)
        self.fc1 = nn.Linear(hidden_size, router_hidden_size)
        self.fc2 = nn.Linear(router_hidden_size, num_configurations)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(hidden))))


# --------------------------------------------------------------------------------------------------
# Token reduction (VISOR-TR packing and training-free pruning). The paper's supplement that describes
# VISOR-TR is not available: this is our design. Reduction runs per image on the projector's output,
# keeps image_newline tokens, and keeps every surviving token at its original position.
# --------------------------------------------------------------------------------------------------


class VisorTokenPacker(nn.Module):
    """VISOR-TR: concatenate k consecutive visual tokens along channels and project back to the model width.

    Starts as the mean of each group (weight = [I/k ... I/k]); trained with the stage1/universal commands.
    """

    def __init__(self, hidden_size: int, factor: int):
        super().__init__()
        self.factor = factor
        # nn.Linear(k * H, H, bias=False)'s weight, held directly so that no generic initialisation touches it
        self.weight = nn.Parameter(torch.eye(hidden_size).repeat(1, factor) / factor)

    def reset_to_mean(self) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.weight.shape[0]).repeat(1, self.factor) / self.factor)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (N, H) of one row -> packed (ceil(N / k), H) and the position (index) of each group's first token.
        The last group is padded by repeating the row's last token."""
        length = tokens.shape[0]
        groups = -(-length // self.factor)
        padded = torch.cat([tokens, tokens[-1:].expand(groups * self.factor - length, -1)])
        packed = F.linear(padded.reshape(groups, -1).to(self.weight.dtype), self.weight).to(tokens.dtype)
        return packed, torch.arange(groups, device=tokens.device) * self.factor


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def select_visionzip(features, scores, keep: int, dominant_fraction: float):
    """VisionZip on one segment: the `dominant` tokens that receive most attention, plus contextual tokens made by
    merging every other token into the most similar of evenly spaced targets (mean of each target's group).
    Similarity is the cosine of the projected features. Returns (features (keep, H), positions (keep,)), sorted."""
    length = features.shape[0]
    dominant_count = keep if keep < 2 else max(1, round(keep * dominant_fraction))
    context_count = keep - dominant_count
    dominant = torch.topk(scores, dominant_count).indices
    rest = torch.ones(length, dtype=torch.bool, device=features.device)
    rest[dominant] = False
    rest = torch.nonzero(rest).flatten()
    kept_features, positions = [features[dominant]], [dominant]
    if context_count > 0 and rest.numel() > 0:
        stride = max(1, rest.numel() // context_count)
        targets = rest[::stride][:context_count]
        assignment = cosine_similarity_matrix(features[rest], features[targets]).argmax(-1)  # (R,)
        sums = torch.zeros(len(targets), features.shape[1], dtype=torch.float32, device=features.device)
        sums.index_add_(0, assignment, features[rest].float())
        counts = torch.bincount(assignment, minlength=len(targets)).clamp(min=1).unsqueeze(-1)
        kept_features.append((sums / counts).to(features.dtype))
        positions.append(targets)
    return sort_by_position(torch.cat(kept_features), torch.cat(positions))


def select_vispruner(features, scores, keep: int, important_fraction: float):
    """VisPruner on one segment: the important tokens (most attention received), plus diverse tokens chosen from the
    rest by repeatedly dropping the most duplicated ones (ToMe-style alternate split, at most 8 a step)."""
    important_count = min(keep, int(keep * important_fraction))
    order = torch.argsort(scores, descending=True)
    important, rest = order[:important_count], order[important_count:]
    diverse_count = keep - important_count
    while rest.numel() > diverse_count:
        a, b = rest[::2], rest[1::2]
        if b.numel() == 0:
            rest = rest[:diverse_count]
            break
        duplication = cosine_similarity_matrix(features[a], features[b]).max(-1).values
        drop = min(8, rest.numel() - diverse_count, a.numel())
        dropped = a[torch.topk(duplication, drop).indices]
        rest = rest[~torch.isin(rest, dropped)]
    positions = torch.cat([important, rest])
    return sort_by_position(features[positions], positions)


def sort_by_position(features, positions):
    order = torch.argsort(positions)
    return features[order], positions[order]


def compact_kept_tokens(is_visual: torch.Tensor, kept: list[torch.Tensor]):
    """Shorten a batch of prompts to the tokens that survive reduction (all text, the kept visual tokens).

    is_visual (B, S); kept: per image, in placeholder order, a bool mask over its tokens. Returns the index of each
    surviving token in the original layout (B, S') and which of the S' slots hold one. Shorter prompts start with
    empty slots, like left padding, so that the last slot is the last token of every prompt.
    """
    keep = (~is_visual).masked_scatter(is_visual, torch.cat(kept).to(is_visual.device))
    length = int(keep.sum(1).max())
    restore_index = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, keep.shape[1] - length :]
    return restore_index, keep.gather(1, restore_index)


def reduction_segments(is_newline: torch.Tensor, base_length: int, method: str) -> list[torch.Tensor]:
    """The token positions reduced together (newlines excluded; empty segments dropped): pruning selects within the
    base tile and within the high-resolution grid; packing groups tokens within a row (the base tile is one row)."""
    positions = torch.arange(is_newline.shape[0], device=is_newline.device)
    grid = (positions >= base_length) & ~is_newline
    segments = [positions[:base_length][~is_newline[:base_length]]]
    if method == "pack":
        row_ids = torch.cumsum(is_newline.long(), 0) - is_newline.long()  # rows end at their newline
        segments += [positions[grid & (row_ids == row)] for row in torch.unique(row_ids[grid]).tolist()]
    else:
        segments.append(positions[grid])
    return [segment for segment in segments if segment.numel() > 0]


def reduce_image_tokens(features, is_newline, scores, base_length: int, setting: dict, packer=None):
    """Reduce one image's visual tokens. features (N, H); is_newline (N,); scores (N,) or None (packing).

    Segments: the base tile (first `base_length` tokens) and the high-resolution grid after it. Pruning keeps
    ceil(n * keep_ratio) tokens of each segment; packing packs each row of the grid (the base tile counts as one
    row) in groups of k. Newline tokens are always kept. Returns (features (M, H), positions (M,)) in order.
    """
    positions = torch.arange(features.shape[0], device=features.device)
    kept_features, kept_positions = [features[is_newline]], [positions[is_newline]]
    for segment in reduction_segments(is_newline, base_length, setting["method"]):
        if setting["method"] == "pack":
            packed, offsets = packer(features[segment])
            kept_features.append(packed)
            kept_positions.append(segment[offsets])
            continue
        keep = math.ceil(segment.numel() * setting["keep_ratio"])
        select = select_visionzip if setting["method"] == "visionzip" else select_vispruner
        fraction = setting["dominant_fraction"] if setting["method"] == "visionzip" else setting["important_fraction"]
        chosen, local = select(features[segment], scores[segment], keep, fraction)
        kept_features.append(chosen)
        kept_positions.append(segment[local])
    return sort_by_position(torch.cat(kept_features), torch.cat(kept_positions))


def image_token_layout(config, image_sizes, batch_num_images=None, crop_scores=None, device="cpu"):
    """Per image: which packed tokens are image_newline, each token's score (inf at newlines; None without
    `crop_scores`) and the length of the base tile. Runs LLaVA-OneVision's own packing on one-channel maps, so it
    follows anyres unpadding exactly; it needs only the config (`flops.count_flops` calls it without a model)."""
    crop = config.vision_config.image_size
    per_crop = (crop // config.vision_config.patch_size) ** 2
    per_crop -= 1 if config.vision_feature_select_strategy == "default" else 0
    image_sizes = [[int(x) for x in size] for size in image_sizes]
    single = [n == 1 for n in batch_num_images for _ in range(n)] if batch_num_images is not None else None
    patches = [
        image_size_to_num_patches(size, config.image_grid_pinpoints, crop) if single is None or single[i] else 1
        for i, size in enumerate(image_sizes)
    ]
    holder = SimpleNamespace(config=config)  # pack_image_features reads only self.config
    pack = lambda maps, newline: LlavaOnevisionModel.pack_image_features(
        holder, maps, image_sizes, image_newline=newline, vision_aspect_ratio=config.vision_aspect_ratio
    )[0]
    markers = pack([torch.zeros(n, per_crop, 1, device=device) for n in patches], torch.ones(1, device=device))
    if crop_scores is None:
        scores = [None] * len(patches)
    else:
        maps = [m.unsqueeze(-1) for m in torch.split(crop_scores.to(device), patches)]
        scores = [m[:, 0] for m in pack(maps, torch.full((1,), float("inf"), device=device))]
    return [(m[:, 0] == 1, score, per_crop) for m, score in zip(markers, scores)]


def attention_received(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """(crops, T) mean attention each token receives in one attention layer, averaged over heads and queries, from
    that layer's query and key projections (crops, T, C). One crop at a time: memory stays at one T x T map a head."""
    scores = []
    for query, key in zip(queries, keys):
        heads = lambda x: x.view(x.shape[0], num_heads, -1).transpose(0, 1)  # (h, T, d)
        probs = torch.softmax(heads(query) @ heads(key).transpose(1, 2) * scale, -1)
        scores.append(probs.float().mean(dim=(0, 1)))
    return torch.stack(scores)


NEW_MODULE_TYPES = (VisorCrossAttention, VisorRouter, VisorTokenPacker)  # what VISOR adds to LLaVA-OneVision


def init_new_module(module: nn.Module, std: float) -> None:
    """The one initialisation of a new part, as identity: gate and CPE zero, norms one, packer the mean of its group,
    router MLP normal(0, std) with zero biases (untrained: the default budget stays "full"). Cross-attention
    projections get the same normal init here; `VisorPreTrainedModel.init_new_parameters` then copies them.
    Written with transformers' init functions, which on 5.x leave weights already loaded from a checkpoint alone."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                _init.normal_(sub.weight, mean=0.0, std=std)
                if sub.bias is not None:
                    _init.zeros_(sub.bias)
            elif isinstance(sub, Qwen2RMSNorm):
                _init.ones_(sub.weight)
            elif isinstance(sub, VisorCPE):
                _init.zeros_(sub.weight)
                _init.zeros_(sub.bias)
            elif isinstance(sub, VisorCrossAttention):
                _init.zeros_(sub.gate)
            elif isinstance(sub, VisorTokenPacker) and not getattr(sub.weight, "_is_hf_initialized", False):
                sub.reset_to_mean()


# --------------------------------------------------------------------------------------------------
# Input check at the model's boundary
# --------------------------------------------------------------------------------------------------


def check_prompt_inputs(
    input_ids, attention_mask, inputs_embeds, pixel_values, image_sizes, pixel_values_videos, config
) -> tuple[int, int]:
    """The one check of a prompt's inputs, before anything runs: each error names the argument, the shape or value seen
    and what is expected. Accepts what LLaVA-OneVision accepts (e.g. int32 ids, which `forward` makes int64).
    Returns the image and video placeholder counts of input_ids (read from the device in one host sync)."""
    if input_ids is None:
        raise ValueError("VISOR needs input_ids: image placeholders are found by token id")
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor of token ids; got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be (batch, length) with at least one token; got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(input_ids.shape)}, that of input_ids"
        )
    if inputs_embeds is not None and tuple(inputs_embeds.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"inputs_embeds has shape {tuple(inputs_embeds.shape)}; expected {tuple(input_ids.shape)} + (hidden size,), "
            "one embedding per token of input_ids (VISOR also needs input_ids to find the image placeholders)"
        )
    counts = [(input_ids == config.image_token_id).sum(), (input_ids == config.video_token_id).sum()]
    if pixel_values is not None and image_sizes is not None:  # read with the counts: one host sync for the prompt
        counts.append((torch.as_tensor(image_sizes, device=input_ids.device) <= 0).any().long())
    num_placeholders, num_video_placeholders, *bad_sizes = torch.stack(counts).tolist()
    check_video_inputs(pixel_values_videos, num_video_placeholders, config.video_token_id)
    check_image_inputs(pixel_values, image_sizes, num_placeholders, config.image_token_id, any(bad_sizes))
    return num_placeholders, num_video_placeholders


def check_image_inputs(
    pixel_values, image_sizes, num_placeholders: int, image_token_id: int, nonpositive_sizes: bool
) -> None:
    """Images as LLaVA-OneVision takes them: image_sizes (images, 2) beside pixel_values, and image placeholders in
    input_ids exactly when images are given. `nonpositive_sizes`: some image size is <= 0 (read by the caller)."""
    if pixel_values is None:
        if num_placeholders:
            raise ValueError(f"input_ids hold {num_placeholders} image placeholder tokens but pixel_values is None")
        return
    num_images = pixel_values.shape[0]
    if image_sizes is None or tuple(torch.as_tensor(image_sizes).shape) != (num_images, 2):
        seen = None if image_sizes is None else tuple(torch.as_tensor(image_sizes).shape)
        raise ValueError(
            f"image_sizes must be ({num_images}, 2), one (height, width) per image of pixel_values; got {seen}"
        )
    if nonpositive_sizes:
        raise ValueError(f"image_sizes must be positive heights and widths; got {torch.as_tensor(image_sizes).tolist()}")
    if num_placeholders == 0:
        raise ValueError(
            f"pixel_values hold {num_images} images but input_ids has no image placeholder (token id {image_token_id}); "
            "was the prompt truncated, or the image token left out of the text?"
        )


def check_video_inputs(pixel_values_videos, num_placeholders: int, video_token_id: int) -> None:
    """Videos as LLaVA-OneVision takes them: pixel_values_videos (videos, frames, channels, height, width), and video
    placeholders in input_ids exactly when videos are given."""
    has_placeholders = num_placeholders > 0
    if pixel_values_videos is None:
        if has_placeholders:
            raise ValueError(f"input_ids hold video placeholder tokens (id {video_token_id}) but pixel_values_videos is None")
        return
    if pixel_values_videos.dim() != 5:
        raise ValueError(
            f"pixel_values_videos must be (videos, frames, channels, height, width); got shape {tuple(pixel_values_videos.shape)}"
        )
    if not has_placeholders:
        raise ValueError(
            f"pixel_values_videos hold {pixel_values_videos.shape[0]} videos but input_ids has no video placeholder "
            f"(token id {video_token_id}); was the prompt truncated, or the video token left out of the text?"
        )


# --------------------------------------------------------------------------------------------------
# What flows through the layers, and what the layers need to know about the prompt
# --------------------------------------------------------------------------------------------------


@dataclass
class VisorStreams:
    """The hidden states of one forward call as they flow through the layers: the text stream (B, Nt, H) and, at
    prefill, the visual stream (B, Nv, H) (None when decoding or without images). Both are in the dense sequence's
    order; `text_index` / `visual_index` (B, Nt) / (B, Nv) say where each slot sits in the dense layout, so that a
    self-attention layer can run on [V; T] in the dense order (`dense`, `split`)."""

    text: torch.Tensor
    text_rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of the text slots
    cross_mask: torch.Tensor | None  # what cross-attention lets each text query read (see VisorPromptState.cross_mask)
    visual: torch.Tensor | None = None
    text_index: torch.Tensor | None = None
    visual_index: torch.Tensor | None = None
    dense_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) of the dense layout
    visual_image_ids: torch.Tensor | None = None  # (B, Nv) which image a visual slot belongs to, -1 for padding
    visual_layout: VisualLayout | None = None  # of visual_image_ids, computed once for every CPE

    def dense(self, is_visual: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[V; T] in the dense order, (B, S, H), of all samples or of `rows`. The two streams are padded to the longest
        sample's, so their slots overlap in the dense layout where one sample has more visual tokens than another:
        `is_visual` (B, S) decides."""
        pick = (lambda x: x) if rows is None else (lambda x: x.index_select(0, rows))
        is_visual = pick(is_visual)
        out = self.text.new_zeros(*is_visual.shape, self.text.shape[-1])
        visual = out.scatter(1, expand_index(pick(self.visual_index), out), pick(self.visual))
        text = out.scatter(1, expand_index(pick(self.text_index), out), pick(self.text))
        return torch.where(is_visual.unsqueeze(-1), visual, text)

    def split(self, dense: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Take the streams back from a self-attention layer's output (B, S, H), of all samples or of `rows`."""
        text_index, visual_index = self.text_index, self.visual_index
        if rows is None:
            self.text, self.visual = dense.gather(1, expand_index(text_index, dense)), dense.gather(1, expand_index(visual_index, dense))
            return
        text_index, visual_index = text_index.index_select(0, rows), visual_index.index_select(0, rows)
        self.text = self.text.index_copy(0, rows, dense.gather(1, expand_index(text_index, dense)))
        self.visual = self.visual.index_copy(0, rows, dense.gather(1, expand_index(visual_index, dense)))


def expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, N) token indices -> (B, N, H) for gather/scatter along dim 1 of `like` (B, S, H)."""
    return index.unsqueeze(-1).expand(-1, -1, like.shape[-1])


ALL_ROWS = "all"  # `VisorPromptState.visual_split`: every sample runs the layer on its visual tokens


@dataclass
class RowSplit:
    """The samples of a batch that run a layer on [V; T] (`dense`) and those that run it on their text only (`text`), as
    device row indices and host lists."""

    dense: torch.Tensor
    text: torch.Tensor
    dense_host: list[int]
    text_host: list[int]


@dataclass
class VisorPromptState:
    """What every layer needs to know about the prompt, at prefill and at each decoding step after it; one row per
    sample. It answers one question per mask (`text_mask`, `dense_mask`, `cross_mask`) and changes in two places only:
    `set_configurations` (the budget or the router chose) and `append` (new tokens). Masks are boolean, True = may
    attend; None means the kernel needs no mask tensor (no padding and nothing to hide, see `attend`).

    Per layer, the cache holds: visual + text keys at `visual_layers` (some sample with images runs the layer on its
    visual tokens; a sample that skips it has its visual keys hidden there), text keys everywhere else."""

    is_visual: torch.Tensor  # (B, S) the prompt's dense layout: which tokens are visual
    dense_valid: torch.Tensor  # (B, S + t) keys of the dense sequence that are not padding
    text_valid: torch.Tensor  # (B, Nt + t) keys of the text stream that are not padding
    visual_valid: torch.Tensor  # (B, Nv) visual tokens that are not padding
    has_visual: list[bool]  # per sample, on the host
    num_layers: int
    dense_padded: bool  # some key of the dense sequence is padding
    text_padded: bool  # the same for the text stream
    visual_padded: bool  # the same for the visual tokens that cross-attention reads
    seq_length: int  # dense length seen so far (prompt + decoded)
    prompt_length: int  # dense length of the prompt
    configurations: list[tuple[int, ...]] = field(default_factory=list)  # per sample: the self-attention layers it runs
    routing_pending: list[bool] = field(default_factory=list)  # per sample: the router has yet to choose (budget "auto")
    cross_key_values: dict = field(default_factory=dict)  # layer -> (keys, values) of CPE(V), filled at prefill
    # derived from `configurations` by `set_configurations`:
    visual_layers: frozenset = frozenset()  # layers some sample with images runs on its visual tokens
    _runs: dict = field(default_factory=dict)  # layer -> per sample: runs it on its visual tokens (see visual_split)
    _splits: dict = field(default_factory=dict)  # see visual_split
    # static cache (`make_static`): tokens decoded so far, on the device, and where the prompt's keys end in each stream
    decoded: torch.Tensor | None = None
    text_start: int = 0
    dense_start: int = 0

    def set_configurations(self, configurations: list[tuple[int, ...]]) -> None:
        """The self-attention layers of each sample (decided on the host, so no layer waits for the GPU to say so)."""
        # operator.index: plain ints. Under torch.compile(dynamic=True), ints that cross a graph break arrive symbolic and
        # membership tests (`layer in configuration`) on them go wrong; index() specialises them (a guard). The layers'
        # decisions are kept as bools and a set of ints, made here, so no later frame tests membership in a configuration.
        configurations = [tuple(map(operator.index, c)) for c in configurations]
        self.configurations = configurations
        self.visual_layers = frozenset(set().union(*[set(c) for c, has in zip(configurations, self.has_visual) if has]))
        self._runs = {
            layer: tuple(has and layer in c for c, has in zip(configurations, self.has_visual)) for layer in self.visual_layers
        }

    def visual_split(self, layer: int) -> "RowSplit | str | None":
        """At prefill, who runs `layer` on visual tokens: None (no sample: a text-only layer), ALL_ROWS (every sample),
        or a `RowSplit` (some samples run it on [V; T], the others on their text only). Decided on the host; the row
        index tensors are made once per distinct split."""
        if layer not in self.visual_layers:
            return None
        runs = self._runs[layer]
        if all(runs):
            return ALL_ROWS
        if runs not in self._splits:
            dense_host = [b for b, r in enumerate(runs) if r]
            text_host = [b for b, r in enumerate(runs) if not r]
            as_rows = lambda rows: torch.tensor(rows, device=self.is_visual.device)
            self._splits[runs] = RowSplit(as_rows(dense_host), as_rows(text_host), dense_host, text_host)
        return self._splits[runs]

    def text_mask(self, num_queries: int) -> torch.Tensor | None:
        """A text-only layer: the Q new text tokens read the text keys up to themselves."""
        if self.decoded is not None:
            return causal_allowed(self.text_valid, num_queries, self.text_start + self.decoded)
        return causal_allowed(self.text_valid, num_queries) if self.text_padded else None

    def dense_mask(self, num_queries: int) -> torch.Tensor | None:
        """A layer run on [V; T] (by every sample it is asked for, see `visual_split`): the Q newest tokens of the dense
        sequence read the keys up to themselves."""
        if self.decoded is not None:
            return causal_allowed(self.dense_valid, num_queries, self.dense_start + self.decoded)
        return causal_allowed(self.dense_valid, num_queries) if self.dense_padded else None

    def cross_mask(self, num_queries: int, text_index=None, visual_index=None) -> torch.Tensor | None:
        """Cross-attention keeps the dense causal order: a text token reads the images placed before it. Given the
        prompt's text and visual slots' dense indices (prefill); without them the queries follow the whole prompt."""
        if text_index is not None:  # (B, 1, Nt, Nv)
            return (self.visual_valid[:, None, :] & (visual_index[:, None, :] < text_index[:, :, None])).unsqueeze(1)
        if not self.visual_padded and num_queries == 1:
            return None
        return self.visual_valid[:, None, None, :].expand(-1, 1, num_queries, -1)

    def make_static(self, room: int) -> None:
        """From now on the key-validity rows have a fixed length (the prompt's, then `room` slots for new tokens, not
        valid until written) and the count of decoded tokens lives on the device: a decoding step has fixed shapes and
        asks the host nothing, so it compiles once (`torch.compile(fullgraph=True)`, CUDA graphs)."""
        self.decoded = torch.zeros((), dtype=torch.long, device=self.text_valid.device)
        self.text_start, self.dense_start = self.text_valid.shape[1], self.dense_valid.shape[1]
        self.text_valid, self.dense_valid = F.pad(self.text_valid, (0, room)), F.pad(self.dense_valid, (0, room))

    def append(self, new_valid: torch.Tensor, all_valid: bool | None) -> None:
        """Q new tokens (new_valid (B, Q)) join the sequence; `all_valid`: none of them is padding (known on the host;
        None with a static cache, which always masks)."""
        if self.decoded is not None:  # written in place; `advance` moves the count after the step
            index = self.decoded + torch.arange(new_valid.shape[1], device=new_valid.device)
            self.text_valid.index_copy_(1, self.text_start + index, new_valid)
            self.dense_valid.index_copy_(1, self.dense_start + index, new_valid)
            return
        self.text_valid = torch.cat([self.text_valid, new_valid], dim=1)
        self.dense_valid = torch.cat([self.dense_valid, new_valid], dim=1)
        self.seq_length += new_valid.shape[1]
        if not all_valid:
            self.dense_padded = self.text_padded = True

    def drop_newest(self, count: int) -> None:
        """The newest `count` decoded tokens leave the sequence (`VisorCache.crop`)."""
        self.text_valid, self.dense_valid = self.text_valid[:, :-count], self.dense_valid[:, :-count]
        self.seq_length -= count

    def advance(self, num_new: int) -> None:
        """After a decoding step with a static cache: the step's tokens are in (see `append`)."""
        if self.decoded is not None:
            self.decoded += num_new

    def index_select(self, index: torch.Tensor) -> None:
        """Keep the samples `index` (beam search reorders them)."""
        for name in ("is_visual", "dense_valid", "text_valid", "visual_valid"):
            setattr(self, name, getattr(self, name).index_select(0, index.to(getattr(self, name).device)))
        host_index = index.tolist()
        self.configurations = [self.configurations[i] for i in host_index]
        self.has_visual = [self.has_visual[i] for i in host_index]
        self.cross_key_values = {
            layer: (k.index_select(0, index.to(k.device)), v.index_select(0, index.to(v.device)))
            for layer, (k, v) in self.cross_key_values.items()
        }


@dataclass
class VisorPrompt:
    """The dense sequence of a prompt as `VisorModel.build_prompt` makes it; `compact` drops reduced-away tokens and
    `restore` maps the output back to the caller's layout."""

    input_ids: torch.Tensor  # (B, S); -1 in slots emptied by token reduction
    embeds: torch.Tensor  # (B, S, H)
    is_visual: torch.Tensor  # (B, S)
    valid: torch.Tensor  # (B, S) not padding
    position_ids: torch.Tensor  # (B, S) RoPE positions of the dense sequence
    length: int  # the prompt's length as the caller sees it
    image_ids: torch.Tensor | None = None  # (B, S) which image a visual token belongs to, -1 elsewhere
    restore_index: torch.Tensor | None = None  # (B, S') each slot's index in the caller's layout (token reduction)

    def __post_init__(self):
        if self.image_ids is None:
            self.image_ids = torch.full_like(self.input_ids, -1)

    def place_media(
        self, placeholders: torch.Tensor, num_placeholders: int, lengths: list[int], first_id: int = 0, kind: str = "image"
    ):
        """Number one modality's items (`kind`: images or videos, `lengths` placeholders each, in prompt order) from
        `first_id` in `image_ids`, checking their `num_placeholders` placeholders (mask (B, S)) against the features."""
        if sum(lengths) != num_placeholders:
            raise ValueError(
                f"{kind.capitalize()} features and {kind} tokens do not match: {num_placeholders} {kind} placeholder "
                f"tokens in input_ids, {sum(lengths)} visual tokens from the pixels ({len(lengths)} {kind}s)"
            )
        item_of_token = torch.repeat_interleave(  # output_size: its length is known, so nothing waits for the device
            torch.arange(len(lengths)) + first_id, torch.tensor(lengths), output_size=num_placeholders
        )
        self.image_ids = self.image_ids.masked_scatter(placeholders, item_of_token.to(self.image_ids))

    def scatter_features(self, placeholders: torch.Tensor, features: list[torch.Tensor]) -> None:
        """The features (one (N_i, H) tensor per item, in prompt order) at their placeholders (B, S)."""
        features = torch.cat(features).to(self.embeds.device, self.embeds.dtype)
        self.embeds = self.embeds.masked_scatter(placeholders.unsqueeze(-1), features)

    def compact(self, restore_index: torch.Tensor, slot_valid: torch.Tensor) -> None:
        """Keep the slots `restore_index` (B, S') of the prompt; `slot_valid` (B, S') says which hold a token."""
        take = lambda x: x.gather(1, restore_index)
        self.restore_index = restore_index
        self.is_visual = take(self.is_visual) & slot_valid
        self.valid = take(self.valid) & slot_valid
        self.position_ids = take(self.position_ids)
        self.image_ids = torch.where(self.is_visual, take(self.image_ids), -1)
        self.input_ids = torch.where(slot_valid, take(self.input_ids), -1)
        self.embeds = self.embeds.gather(1, expand_index(restore_index, self.embeds))

    def restore(self, text_index: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The text stream's hidden states (B, Nt, H) in the caller's (B, S, H) layout; zeros at image placeholders."""
        if self.restore_index is not None:
            text_index = self.restore_index.gather(1, text_index)
        out = text.new_zeros(text.shape[0], self.length, text.shape[-1])
        return out.scatter(1, expand_index(text_index, out), text)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


class RowGroupCache:
    """One layer's keys/values for a group of samples that run it the same way, in a batch whose samples do not all
    (`VisorModel.split_layer_step`): the samples that run it on [V; T] keep dense keys, the others text keys only. The
    layer gets the group's cache as its cache (its `update` is all a layer calls)."""

    def __init__(self, rows: torch.Tensor, rows_host: list[int], runs_visual: bool):
        self.rows, self.rows_host, self.runs_visual = rows, rows_host, runs_visual
        self.keys = self.values = None
        self.static_start, self.decoded = None, None  # set by `VisorCache.make_static`

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.static_start is not None:
            return write_in_place(self, key, value, self.static_start, self.decoded)
        if self.keys is not None:
            key, value = torch.cat([self.keys, key], dim=-2), torch.cat([self.values, value], dim=-2)
        self.keys, self.values = key, value
        return key, value

    def select(self, picked: list[tuple[int, int]]) -> "RowGroupCache":
        """The group after the batch is re-indexed: `picked` lists (new row, position in this group)."""
        group = RowGroupCache(self.rows.new_tensor([row for row, _ in picked]), [row for row, _ in picked], self.runs_visual)
        local = self.keys.new_tensor([position for _, position in picked], dtype=torch.long)
        group.keys, group.values = self.keys.index_select(0, local), self.values.index_select(0, local)
        group.static_start, group.decoded = self.static_start, self.decoded
        return group


class RowGroupsStep:
    """The cache a layer sees in a decoding step when its samples ran it differently at prefill (`split_layer_step`):
    the layer runs once on the whole batch (its weights read once), and only attention splits by group. `update` gives
    each group its rows' new keys/values and returns all groups' keys/values as one `GroupedKeyValues`, which
    `visor_attention` reads group by group. `masks`: each group's mask, for its rows."""

    def __init__(self, groups: list["RowGroupCache"], masks: list[torch.Tensor | None]):
        self.groups, self.masks = groups, masks

    def update(self, key, value, layer_idx, *args, **kwargs):
        keys, values = [], []
        for group in self.groups:
            group_key, group_value = group.update(key.index_select(0, group.rows), value.index_select(0, group.rows), layer_idx)
            keys.append(group_key)
            values.append(group_value)
        grouped = GroupedKeyValues([group.rows for group in self.groups], keys, values, self.masks)
        return grouped, grouped


def write_in_place(holder, key, value, start: int, decoded: torch.Tensor):
    """A static cache's update: `holder.keys`/`.values` (B, kvh, prompt + room, d) get the new keys/values at
    `start + decoded` onwards, in place (fixed shapes, no host sync). Returns the whole buffers."""
    index = start + decoded + torch.arange(key.shape[2], device=key.device)
    holder.keys.index_copy_(2, index, key)
    holder.values.index_copy_(2, index, value)
    return holder.keys, holder.values


class VisorCache(DynamicCache):
    """A `DynamicCache` whose layers hold different token sets (see the module docstring), plus the prompt
    state that decoding needs. `get_seq_length` counts positions of the dense sequence."""

    def __init__(self, max_cache_len: int | None = None):
        super().__init__()
        self.prompt: VisorPromptState | None = None
        self.row_groups: dict[int, list[RowGroupCache]] = {}  # layers whose samples ran them differently
        # static: preallocated after the prefill for max_cache_len positions of the dense sequence (see make_static)
        self.static_length = max_cache_len
        self.static_start: dict[int, int] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.prompt is None:
            return 0
        decoded = 0 if self.prompt.decoded is None else int(self.prompt.decoded)
        return self.prompt.seq_length + decoded

    def crop(self, max_length: int) -> None:
        """Drop the newest tokens, as assisted decoding and prompt lookup do after rejected candidates: `max_length` > 0
        keeps that many positions of the dense sequence (4.57's meaning), <= 0 drops -max_length tokens (5.x's). Only
        decoded tokens can be dropped; every layer (and row group) drops them from its end, whatever token set it holds."""
        if self.prompt is None:
            return
        length = self.get_seq_length()
        drop = -max_length if max_length <= 0 else length - max_length
        if drop <= 0:
            return
        if self.prompt.decoded is not None:
            raise NotImplementedError("a static VisorCache cannot be cropped; use the default dynamic cache")
        if drop > length - self.prompt.prompt_length:
            raise ValueError(f"cannot crop {drop} tokens: only {length - self.prompt.prompt_length} were decoded")
        holders = [layer for layer in self.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]
        holders += [group for groups in self.row_groups.values() for group in groups]
        for holder in holders:
            holder.keys, holder.values = holder.keys[..., :-drop, :], holder.values[..., :-drop, :]
        self.prompt.drop_newest(drop)

    def make_static(self) -> None:
        """Called once the prefill filled the cache: every layer's keys/values (and every row group's) get room for the
        new tokens up to `max_cache_len`, written in place from now on, and the prompt state keeps fixed shapes."""
        room = max(1, self.static_length - self.prompt.seq_length)
        pad = (0, 0, 0, room)  # (B, kvh, N, d): room after the N cached tokens
        holders = [(layer_idx, layer) for layer_idx, layer in enumerate(self.layers) if getattr(layer, "keys", None) is not None
                   and layer.keys.numel()] + [(None, group) for groups in self.row_groups.values() for group in groups]
        for layer_idx, holder in holders:
            start = holder.keys.shape[2]
            holder.keys, holder.values = F.pad(holder.keys, pad), F.pad(holder.values, pad)
            if layer_idx is None:
                holder.static_start, holder.decoded = start, None  # decoded is set below, once the state has it
            else:
                self.static_start[layer_idx] = start
        self.prompt.make_static(room)
        for groups in self.row_groups.values():
            for group in groups:
                group.decoded = self.prompt.decoded
        # Buffers a compiled step writes in place keep their address: CUDA graphs may capture them (as transformers'
        # StaticCache marks its keys and values)
        state = self.prompt
        for tensor in [h.keys for _, h in holders] + [h.values for _, h in holders] + [state.text_valid, state.dense_valid, state.decoded]:
            torch._dynamo.mark_static_address(tensor)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx in self.static_start:
            return write_in_place(self.layers[layer_idx], key_states, value_states, self.static_start[layer_idx], self.prompt.decoded)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.select_rows(indices)

    def select_rows(self, index: torch.Tensor) -> None:
        """VISOR's part of a re-indexed batch (new row i is old row index[i]): the prompt state and the row groups."""
        if self.prompt is not None:
            self.prompt.index_select(index)
        index = index.tolist()
        for layer, groups in self.row_groups.items():
            regrouped = []
            for group in groups:
                position = {row: p for p, row in enumerate(group.rows_host)}
                picked = [(new, position[old]) for new, old in enumerate(index) if old in position]
                if picked:
                    regrouped.append(group.select(picked))
            self.row_groups[layer] = regrouped


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class VisorModelOutput(ModelOutput):
    """last_hidden_state: (B, S, H) at prefill (dense layout; values at image placeholders unspecified),
    (B, n, H) when decoding n new tokens. The cache is in `CACHE_FIELD` (`cache` on recent transformers 5.x,
    `past_key_values` on 4.57: the field each line's `generate` reads). `self_attn_layers`: the configuration each sample ran."""

    last_hidden_state: torch.FloatTensor | None = None
    if CACHE_FIELD == "cache":  # the field each line's generate() reads the cache from
        cache: VisorCache | None = None
    else:
        past_key_values: VisorCache | None = None
    self_attn_layers: list | None = None
    router_logits: torch.FloatTensor | None = None  # (B, Nt, num_configurations) over the text buffer
    routing_mask: torch.BoolTensor | None = None  # (B, Nt): which text-buffer slots hold a routing token
    # output_hidden_states: the text stream entering each language-model layer, then the final norm's output (L + 1
    # entries, as transformers' Qwen2 gives them); (B, S, H) at prefill with image placeholders unspecified (zeros),
    # (B, n, H) when decoding. Visual tokens have no entry: most layers never see them.
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class VisorCausalLMOutput(ModelOutput):
    """Like LLaVA-OneVision's output; logits are (B, S, vocab) at prefill, unspecified at image placeholders."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_FIELD == "cache":
        cache: VisorCache | None = None
    else:
        past_key_values: VisorCache | None = None
    self_attn_layers: list | None = None
    router_logits: torch.FloatTensor | None = None
    routing_mask: torch.BoolTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None  # see VisorModelOutput
    attentions: None = None  # VISOR's attention kernels return no weights (output_attentions raises)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class VisorPreTrainedModel(LlavaOnevisionPreTrainedModel):
    config_class = VisorConfig
    config: VisorConfig
    base_model_prefix = "model"
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer", "VisorCrossAttention"]
    _checkpoint_conversion_mapping = {}
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NEW_MODULE_TYPES):
            init_new_module(module, self.config.text_config.initializer_range)

    # ---- VISOR's new parts (torchtune's `fusion_params()`): the one place that says what is new ----------------

    def new_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters LLaVA-OneVision does not have (cross-attention with its gate and CPE, router, VISOR-TR packing
        layer), by name as in `named_parameters()`. The converter, the trainer and the tests ask this method. The
        routing token's embedding row is new too, but it is a row of a pre-trained matrix, not a parameter."""
        prefixes = tuple(f"{name}." for name, module in self.named_modules() if isinstance(module, NEW_MODULE_TYPES))
        return {name: param for name, param in self.named_parameters() if name.startswith(prefixes)}

    def init_new_parameters(self, base_weight=None) -> None:
        """Start every new part as identity (the one initialisation, see `init_new_module`), and copy each
        cross-attention's q/k/v/o projections from the same layer's self-attention (a warm start that the zero gate
        keeps inert). `base_weight(name) -> tensor` reads a LLaVA-OneVision weight by its name in this model
        (default: this model's own weights); the converter passes a reader of the source checkpoint."""
        base_weight = base_weight or (lambda name: self.get_parameter(name))
        std = self.config.text_config.initializer_range
        with torch.no_grad():
            for name, module in self.named_modules():
                if not isinstance(module, NEW_MODULE_TYPES):
                    continue
                init_new_module(module, std)
                if isinstance(module, VisorCrossAttention):
                    layer = name.rsplit(".", 1)[-1]
                    base = name.removesuffix(f"cross_attn.{layer}") + f"language_model.layers.{layer}.self_attn"
                    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                        for kind, param in getattr(module, proj).named_parameters():
                            param.copy_(base_weight(f"{base}.{proj}.{kind}"))

    # ---- checkpoints readable by transformers 4.57 and 5.x -----------------------------------------
    # 5.x holds SigLIP's weights without the `vision_model.` level and also saves them that way; 4.57 then
    # loads a random vision tower with only a warning. 5.x loads 4.57's layout, so that is the one written.
    # The converter (visor_hf/convert_llava_ov.py) writes the same layout with the same function.

    @staticmethod
    def checkpoint_key(key: str) -> str:
        """The on-disk name of a state-dict key: SigLIP's weights under `vision_tower.vision_model.` (4.57's layout)."""
        head, found, tail = key.partition("vision_tower.")
        if found and (head == "" or head.endswith(".")) and not tail.startswith("vision_model."):
            return f"{head}vision_tower.vision_model.{tail}"
        return key

    @staticmethod
    def portable_text_config(config: dict) -> bool:
        """Give a config dict's text_config the RoPE fields of both lines, in place: 5.x writes only `rope_parameters`,
        from which 4.57 silently falls back to rope_theta=10000; 4.57's `rope_theta`/`rope_scaling` are read by 5.x
        too. Returns whether anything was added."""
        text_config = config.get("text_config") or {}
        rope = text_config.get("rope_parameters")
        if not isinstance(rope, dict) or "rope_theta" in text_config:
            return False
        text_config["rope_theta"] = rope.get("rope_theta")
        if rope.get("rope_type", "default") != "default":
            text_config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return True

    @staticmethod
    def make_config_portable(save_directory) -> None:
        """`portable_text_config` applied to the config.json of `save_directory`."""
        import json
        import os

        path = os.path.join(save_directory, "config.json")
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        if VisorPreTrainedModel.portable_text_config(config):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")

    def save_pretrained(self, save_directory, *args, state_dict=None, push_to_hub: bool = False, **kwargs):
        """As transformers' `save_pretrained`, and the folder loads in both 4.57 and 5.x with `trust_remote_code=True`:
        weights in 4.57's key layout (see `checkpoint_key`), RoPE fields of both lines in config.json, and the Hub
        code files (configuration, modeling, processing) copied next to the weights.
        With `push_to_hub=True` the folder is written, then uploaded in one commit by `push_to_hub`."""
        import os
        import shutil

        hub_kwargs = {}
        if push_to_hub:
            for name in ("repo_id", "commit_message", "private", "token", "create_pr", "revision"):
                if name in kwargs:
                    hub_kwargs[name] = kwargs.pop(name)
            if "token" in hub_kwargs:
                kwargs["token"] = hub_kwargs["token"]
        if state_dict is None:
            state_dict = self.state_dict()
        state_dict = {self.checkpoint_key(key): value for key, value in state_dict.items()}
        if TRANSFORMERS_V5:  # the keys are final; 5.x would otherwise try to revert its load-time renamings
            kwargs.setdefault("save_original_format", False)
        super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        self.make_config_portable(save_directory)
        code_dir = os.path.dirname(os.path.abspath(__file__))
        for name in HUB_CODE_FILES:
            source = os.path.join(code_dir, name)
            target = os.path.join(save_directory, name)
            if os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(target):
                shutil.copyfile(source, target)
        readme = os.path.join(save_directory, "README.md")
        if not os.path.isfile(readme):  # a card someone wrote (the converter's, a user's) is kept
            with open(readme, "w", encoding="utf-8") as f:
                f.write(model_card_text(self.config))
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.push_to_hub(repo_id, **hub_kwargs)

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        """push_to_hub's upload step (both lines), after it wrote README.md: the card already on the Hub is kept;
        transformers' generic "Model Card for Model ID" (written for a repo without one) is replaced by VISOR's."""
        import os

        readme = os.path.join(working_dir, "README.md")
        current = open(readme, encoding="utf-8").read() if os.path.isfile(readme) else None
        if is_generic_model_card(current):
            with open(readme, "w", encoding="utf-8") as f:
                f.write(model_card_text(self.config, repo_id=repo_id))
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As transformers' `from_pretrained`, but a weight the checkpoint lacks is an error, not a random init
        (4.57 only warns, e.g. on a vision tower saved by 5.x without `vision_model.`). A tied `lm_head.weight` is
        not missing."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        missing = sorted(set(info["missing_keys"]) - tied)
        if missing:
            raise ValueError(
                f"{pretrained_model_name_or_path} lacks {len(missing)} weights of {cls.__name__} (they would be "
                f"randomly initialised): {missing[:10]}{' ...' if len(missing) > 10 else ''}. "
                f"Unexpected keys in the checkpoint: {sorted(info['unexpected_keys'])[:10]}"
            )
        return (model, info) if output_loading_info else model


class VisorModel(VisorPreTrainedModel, LlavaOnevisionModel):
    """LLaVA-OneVision's vision tower, projector and language model, run the VISOR way. Returns hidden states."""

    def __init__(self, config: VisorConfig):
        super().__init__(config)
        text_config = config.text_config
        self.cross_attn = nn.ModuleDict(
            {str(layer): VisorCrossAttention(text_config, config.cpe_kernel_size) for layer in config.cross_attn_layers}
        )
        self.router = VisorRouter(
            text_config.hidden_size, config.router_hidden_size, len(config.configurations), text_config.rms_norm_eps
        )
        # The language model's layers run VISOR's masks: their attention reads its function's name from this config.
        for layer in self.language_model.layers:
            layer.self_attn.config = VisorLayerConfig(text_config)
        reduction = config.token_reduction
        self.token_packer = (
            VisorTokenPacker(text_config.hidden_size, reduction["pack_factor"])
            if reduction is not None and reduction["method"] == "pack" else None
        )
        self.post_init()

    # ---- budgets -------------------------------------------------------------------------------

    def resolve_budget(self, budget, batch_size: int) -> list[tuple[int, ...] | None]:
        """One configuration (tuple of layers) per sample; None where the router decides ("auto")."""
        if budget is None:
            budget = self.config.default_budget
        if isinstance(budget, list):
            if len(budget) != batch_size:
                raise ValueError(f"budget is a list of {len(budget)} entries for a batch of {batch_size} samples")
            return [self._resolve_one_budget(b) for b in budget]
        return [self._resolve_one_budget(budget)] * batch_size

    def _resolve_one_budget(self, budget) -> tuple[int, ...] | None:
        configuration = self.config.resolve_budget(budget)
        if configuration is None and self.config.routing_token_id is None:
            raise ValueError(
                "budget='auto' needs a routing token and a trained router (config.routing_token_id is None); "
                "use a fixed budget: 'full', an int k (the configuration with k self-attention layers), or a tuple of "
                f"layers from config.configurations ({self.config.configurations})"
            )
        return configuration

    # ---- visual tokens -------------------------------------------------------------------------

    def visual_features(self, pixel_values, image_sizes, batch_num_images=None) -> list[torch.Tensor]:
        """LLaVA-OneVision's features, one (N_i, H) tensor per image (anyres packing with image_newline)."""
        out = LlavaOnevisionModel.get_image_features(
            self,
            pixel_values,
            image_sizes,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            vision_aspect_ratio=self.config.vision_aspect_ratio,
            batch_num_images=batch_num_images,
        )
        return list(getattr(out, "pooler_output", out))  # 5.x returns an output object, 4.57 a list

    def video_features(self, pixel_values_videos) -> list[torch.Tensor]:
        """LLaVA-OneVision's video features, one (frames * pooled + 1, H) tensor per video: every frame through the
        tower and projector, pooled 2 x 2 (196 tokens a frame at 384 px), one image_newline token after the last."""
        out = LlavaOnevisionModel.get_video_features(
            self, pixel_values_videos, vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        if hasattr(out, "pooler_output"):  # 5.x: an output object, the newline already appended
            return list(out.pooler_output)
        newline = self.image_newline[None, None, :].expand(out.shape[0], 1, -1).to(out)  # 4.57 appends it in forward
        return list(torch.cat([out, newline], dim=1))

    def resolve_token_reduction(self, token_reduction) -> dict | None:
        """The setting of this call: the config's default when None; a packing setting must match the packer."""
        setting = self.config.token_reduction if token_reduction is None else validate_token_reduction(token_reduction)
        if setting is not None and setting["method"] == "pack":
            trained = self.token_packer.factor if self.token_packer is not None else None
            if trained != setting["pack_factor"]:
                raise ValueError(
                    f"token_reduction pack_factor={setting['pack_factor']} does not match the trained packing layer "
                    f"(pack factor {trained}); set config.token_reduction to {{'method': 'pack', 'pack_factor': k}} "
                    "and train the packing layer first"
                )
        if setting is not None and "score_layer" in setting:
            num_vision_layers = self.config.vision_config.num_hidden_layers
            if not -num_vision_layers <= setting["score_layer"] < num_vision_layers:
                raise ValueError(
                    f"token_reduction score_layer={setting['score_layer']} is out of range: the vision tower has "
                    f"{num_vision_layers} layers, so it must be in [{-num_vision_layers}, {num_vision_layers - 1}]"
                )
        return setting

    def visual_features_with_scores(self, pixel_values, image_sizes, batch_num_images, score_layer: int):
        """Features, plus the mean attention each crop token receives in SigLIP layer `score_layer` (SigLIP has no
        CLS token). The layer's own query and key projections are captured as the tower runs, and only the
        scores are computed again: the tower keeps its attention kernel (SDPA, flash), which returns no weights."""
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        attention = tower.encoder.layers[score_layer].self_attn
        captured = {}
        hooks = [
            attention.q_proj.register_forward_hook(lambda module, args, output: captured.__setitem__("queries", output)),
            attention.k_proj.register_forward_hook(lambda module, args, output: captured.__setitem__("keys", output)),
        ]
        try:
            features = VisorModel.visual_features(self, pixel_values, image_sizes, batch_num_images)
        finally:
            for hook in hooks:
                hook.remove()
        scores = attention_received(captured["queries"], captured["keys"], attention.num_heads, attention.scale)
        if self.config.vision_feature_select_strategy == "default":
            scores = scores[:, 1:]
        return features, scores

    def reduce_visual_tokens(self, pixel_values, image_sizes, batch_num_images, setting: dict):
        """Features of each image after token reduction, and which of the image's tokens survive (bool (N_i,)).

        Like `visual_features_with_scores` and `token_layout`, it needs only LLaVA-OneVision's parts, so the dense
        baseline calls it on a transformers `LlavaOnevisionModel` (visor_hf.baselines)."""
        if setting["method"] == "pack":
            features, crop_scores = VisorModel.visual_features(self, pixel_values, image_sizes, batch_num_images), None
        else:
            features, crop_scores = VisorModel.visual_features_with_scores(
                self, pixel_values, image_sizes, batch_num_images, setting["score_layer"]
            )
        layout = image_token_layout(self.config, image_sizes, batch_num_images, crop_scores, features[0].device)
        reduced, kept = [], []
        for feature, (is_newline, scores, base_length) in zip(features, layout):
            if is_newline.shape[0] != feature.shape[0]:
                raise ValueError(f"token layout of {is_newline.shape[0]} tokens for an image of {feature.shape[0]}")
            packer = getattr(self, "token_packer", None)
            chosen, positions = reduce_image_tokens(feature, is_newline, scores, base_length, setting, packer)
            mask = torch.zeros(feature.shape[0], dtype=torch.bool, device=feature.device)
            mask[positions] = True
            reduced.append(chosen)
            kept.append(mask)
        return reduced, kept

    def token_layout(self, image_sizes, batch_num_images, crop_scores, device):
        return image_token_layout(self.config, image_sizes, batch_num_images, crop_scores, device)

    # ---- forward: prompt -> streams -> one layer step per layer -> norm ---------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: VisorCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        budget=None,
        batch_num_images: torch.LongTensor | None = None,
        cache: VisorCache | None = None,
        route_only: bool = False,
        token_reduction=None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        **kwargs,
    ) -> VisorModelOutput:
        if output_attentions:
            raise ValueError(
                "output_attentions is not supported: VISOR's attention runs on SDPA/eager kernels that return no "
                "attention weights, and most layers never attend to the visual tokens (use output_hidden_states)"
            )
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.get_text_config().use_cache and not self.training)
        if input_ids is None:
            raise ValueError("VISOR needs input_ids: image placeholders are found by token id")
        input_ids = input_ids.long() if input_ids.dtype in (torch.int32, torch.int16, torch.uint8) else input_ids
        if isinstance(cache, VisorCache) and cache.prompt is not None:  # decoding: continue from the cache
            prompt, state = None, cache.prompt
            streams = self.decode_streams(input_ids, inputs_embeds, attention_mask, position_ids, state)
        else:
            cache = self.prompt_cache(cache, use_cache)
            counts = check_prompt_inputs(
                input_ids, attention_mask, inputs_embeds, pixel_values, image_sizes, pixel_values_videos, self.config
            )
            prompt = self.build_prompt(
                input_ids, inputs_embeds, pixel_values, image_sizes, attention_mask, position_ids, batch_num_images,
                token_reduction, pixel_values_videos, counts,
            )
            streams, state = self.split_prompt(prompt, self.resolve_budget(budget, input_ids.shape[0]))
        router_logits = routing_mask = None
        hidden_states = [] if output_hidden_states else None
        # Up to the router's layer, the router (a host decision), the rest: routing sits between two loops, not in one,
        # so that under torch.compile its graph break does not send the whole layer loop back to eager.
        routing = any(state.routing_pending)
        split_at = min(self.config.router_layer, self.config.num_layers) if routing or route_only else self.config.num_layers
        for layer_idx in range(split_at):
            self.layer_step(layer_idx, streams, state, cache, hidden_states)
        if routing:
            router_logits, routing_mask = self.route_samples(streams, state, prompt.input_ids)
        if route_only:
            return VisorModelOutput(
                self_attn_layers=state.configurations, router_logits=router_logits, routing_mask=routing_mask
            )
        # (the start read from the config again, not `split_at`: a local that crosses the router's graph break arrives
        # symbolic under torch.compile(dynamic=True), and so would every layer index)
        for layer_idx in range(self.config.router_layer if routing else self.config.num_layers, self.config.num_layers):
            self.layer_step(layer_idx, streams, state, cache, hidden_states)
        hidden, hidden_states = self.finish(streams, state, prompt, cache, hidden_states)
        return VisorModelOutput(
            last_hidden_state=hidden, **{CACHE_FIELD: cache}, self_attn_layers=state.configurations,
            router_logits=router_logits, hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )

    @staticmethod
    def prompt_cache(cache, use_cache: bool) -> "VisorCache | None":
        """The cache a prefill fills: the caller's empty VisorCache (e.g. a static one from generate), else a new
        dynamic one; a cache another model filled cannot be continued."""
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("VISOR continues only from a VisorCache it filled itself; got a non-empty other cache")
        return (cache if isinstance(cache, VisorCache) else VisorCache()) if use_cache else None

    def finish(self, streams, state, prompt, cache, hidden_states: list | None):
        """The final norm. At prefill: the caller's (B, S, H) layout, and the cache keeps the prompt state (made static
        if asked); when decoding: the step's tokens are counted in."""
        hidden = self.language_model.norm(streams.text)
        if hidden_states is not None:
            hidden_states.append(hidden)
        if prompt is None:
            state.advance(streams.text.shape[1])
            return hidden, hidden_states
        if hidden_states is not None:
            hidden_states = [prompt.restore(streams.text_index, h) for h in hidden_states]
        if cache is not None:
            cache.prompt = state
            if cache.static_length is not None:
                cache.make_static()
        return prompt.restore(streams.text_index, hidden), hidden_states

    def layer_step(self, layer_idx: int, streams: VisorStreams, state: VisorPromptState, cache, hidden_states=None) -> None:
        """One language-model layer, then its cross-attention if it has one; updates `streams` (and appends the layer's
        input to `hidden_states` if given). Prefill and decode both run through here. The layer is called through its
        own forward (module call), so hooks on it work."""
        if hidden_states is not None:
            hidden_states.append(streams.text)
        layer = self.language_model.layers[layer_idx]
        implementation = self.config.text_config._attn_implementation or "sdpa"
        split = state.visual_split(layer_idx) if streams.visual is not None else None  # prefill
        if split == ALL_ROWS:  # every sample runs the layer on [V; T] in the dense order
            dense = layer(
                streams.dense(state.is_visual), attention_mask=state.dense_mask(state.is_visual.shape[1]),
                position_embeddings=streams.dense_rope, **{CACHE_FIELD: cache},
            )
            streams.split(dense)
        elif split is not None:  # some samples run it on [V; T], the others on their text only
            self.split_layer_step(layer, layer_idx, streams, state, cache, split)
        elif cache is not None and layer_idx in cache.row_groups:  # decoding a layer the samples ran differently
            groups, num_new = cache.row_groups[layer_idx], streams.text.shape[1]
            masks = [(state.dense_mask if group.runs_visual else state.text_mask)(num_new) for group in groups]
            masks = [None if mask is None else mask.index_select(0, group.rows) for mask, group in zip(masks, groups)]
            streams.text = layer(
                streams.text, attention_mask=None, position_embeddings=streams.text_rope,
                **{CACHE_FIELD: RowGroupsStep(groups, masks)},
            )
        else:  # text only; when decoding, a layer every sample ran on [V; T] reads the visual keys its cache holds
            mask = state.dense_mask if layer_idx in state.visual_layers else state.text_mask
            streams.text = layer(
                streams.text, attention_mask=mask(streams.text.shape[1]), position_embeddings=streams.text_rope,
                **{CACHE_FIELD: cache},
            )
        if str(layer_idx) in self.cross_attn and (streams.visual is not None or layer_idx in state.cross_key_values):
            streams.text, state.cross_key_values[layer_idx] = self.cross_attn[str(layer_idx)](
                streams.text, streams.cross_mask, implementation, key_values=state.cross_key_values.get(layer_idx),
                visual=streams.visual, image_ids=streams.visual_image_ids, layout=streams.visual_layout,
            )

    def split_layer_step(self, layer, layer_idx: int, streams, state, cache, split: RowSplit) -> None:
        """Prefill of a layer that some samples run on [V; T] and the others skip: each group runs as what it is, so a
        sample pays for what it runs, and each group's keys/values go to a cache of its own (`RowGroupCache`): the
        skipping samples cache their text only, as they would alone."""
        dense_group, text_group = RowGroupCache(split.dense, split.dense_host, True), RowGroupCache(split.text, split.text_host, False)
        mask = state.dense_mask(state.is_visual.shape[1])
        dense = layer(
            streams.dense(state.is_visual, split.dense), attention_mask=None if mask is None else mask.index_select(0, split.dense),
            position_embeddings=tuple(x.index_select(0, split.dense) for x in streams.dense_rope),
            **{CACHE_FIELD: dense_group},
        )
        self.text_rows_step(layer, streams, state.text_mask(streams.text.shape[1]), text_group)
        streams.split(dense, split.dense)
        if cache is not None:
            cache.row_groups[layer_idx] = [dense_group, text_group]

    @staticmethod
    def text_rows_step(layer, streams, mask, group: RowGroupCache) -> None:
        """The layer on the text stream of the samples `group.rows`, with the group's cache."""
        pick = lambda x: x.index_select(0, group.rows)
        text = layer(
            pick(streams.text), attention_mask=None if mask is None else pick(mask),
            position_embeddings=tuple(pick(x) for x in streams.text_rope), **{CACHE_FIELD: group},
        )
        streams.text = streams.text.index_copy(0, group.rows, text)

    # ---- prefill: the prompt and its two streams ----------------------------------------------------

    def build_prompt(
        self, input_ids, inputs_embeds, pixel_values, image_sizes, attention_mask, position_ids, batch_num_images,
        token_reduction, pixel_values_videos=None, placeholder_counts: tuple[int, int] = (0, 0),
    ) -> "VisorPrompt":
        """The dense sequence as LLaVA-OneVision builds it: text embeddings with the visual features at the image and
        video placeholders, RoPE positions of the dense sequence; with token reduction, only the surviving tokens.
        Each image or video is one item of `image_ids`: its tokens are one sequence for the CPE and cross-attention.
        `placeholder_counts`: the image and video placeholders of input_ids, as `check_prompt_inputs` returns them."""
        batch, length = input_ids.shape
        reduction = self.resolve_token_reduction(token_reduction)
        embeds = inputs_embeds if inputs_embeds is not None else self.language_model.embed_tokens(input_ids)
        if position_ids is None:  # as LLaVA-OneVision: positions follow the dense sequence
            position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, -1)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_image, is_video = input_ids == self.config.image_token_id, input_ids == self.config.video_token_id
        prompt = VisorPrompt(input_ids, embeds, is_image | is_video, valid, position_ids, length)
        num_images, num_videos = placeholder_counts  # placeholder tokens of each kind
        if num_videos and reduction is not None:
            raise ValueError("token_reduction applies to images only; give videos without it (token_reduction='none')")
        if num_images and reduction is not None:  # placeholders of reduced-away tokens go; survivors keep positions
            features, kept = self.reduce_visual_tokens(pixel_values, image_sizes, batch_num_images, reduction)
            prompt.place_media(is_image, num_images, [k.shape[0] for k in kept])
            prompt.compact(*compact_kept_tokens(prompt.is_visual, kept))
            prompt.scatter_features(prompt.is_visual, features)
        elif num_images:
            features = self.visual_features(pixel_values, image_sizes, batch_num_images)
            prompt.place_media(is_image, num_images, [f.shape[0] for f in features])
            prompt.scatter_features(is_image, features)
        if num_videos:  # video items are numbered after the image items
            first_id = len(features) if num_images else 0
            features = self.video_features(pixel_values_videos)
            prompt.place_media(is_video, num_videos, [f.shape[0] for f in features], first_id=first_id, kind="video")
            prompt.scatter_features(is_video, features)
        return prompt

    def split_prompt(self, prompt: "VisorPrompt", configurations: list) -> tuple[VisorStreams, VisorPromptState]:
        """Split the dense sequence into a left-padded text stream and a right-padded visual stream (both in the dense
        order), and set up the prompt state. The sizes the host needs come from the device in one sync."""
        is_visual, valid = prompt.is_visual, prompt.valid
        is_text = ~is_visual & valid  # padding belongs to neither stream: a sample pays for its own tokens only
        # one host sync for every size the host needs (a plain list: compiled, that is one graph break, not one per read)
        sizes = [is_text.sum(1), is_visual.sum(1), valid.all(1).long(), item_starts(prompt.image_ids).sum(1)]
        text_counts, visual_counts, row_valid, items = torch.stack(sizes).tolist()
        num_text, num_visual = max(text_counts), max(visual_counts)
        # visual positions first, then padding, then text: each stream's slots are its tokens, then filler positions
        order = torch.argsort(torch.where(is_visual, 0, 1 + is_text.to(torch.int8)), dim=1, stable=True)
        text_index, visual_index = order[:, order.shape[1] - num_text :], order[:, :num_visual]  # (B, Nt), (B, Nv)
        visual_valid = is_visual.gather(1, visual_index)
        state = VisorPromptState(
            is_visual=is_visual, dense_valid=valid, text_valid=is_text.gather(1, text_index),
            visual_valid=visual_valid, has_visual=[n > 0 for n in visual_counts], num_layers=self.config.num_layers,
            dense_padded=not all(row_valid), text_padded=any(n < num_text for n in text_counts),
            visual_padded=any(n < num_visual for n in visual_counts), seq_length=prompt.length, prompt_length=prompt.length,
        )
        self.start_configurations(state, configurations)
        cos, sin = self.language_model.rotary_emb(prompt.embeds, prompt.position_ids)  # (B, S, d)
        gather = lambda x, index: x.gather(1, expand_index(index, x))  # (B, S, D) -> (B, N, D)
        streams = VisorStreams(
            text=gather(prompt.embeds, text_index), text_rope=(gather(cos, text_index), gather(sin, text_index)),
            cross_mask=state.cross_mask(num_text, text_index, visual_index), text_index=text_index,
        )
        if num_visual:
            streams.visual, streams.visual_index, streams.dense_rope = gather(prompt.embeds, visual_index), visual_index, (cos, sin)
            streams.visual_image_ids = torch.where(visual_valid, prompt.image_ids.gather(1, visual_index), -1)
            streams.visual_layout = VisualLayout.of(
                streams.visual_image_ids, all_valid=not state.visual_padded, gaps=max(items) - 1
            ) if self.cross_attn else None
        return streams, state

    def start_configurations(self, state: VisorPromptState, configurations: list) -> None:
        """Fixed budgets run their configuration from the start. Until the router layer, a sample left to the router
        runs the layers every configuration shares; with no layer to route at, that is its configuration."""
        config = self.config
        always = tuple(sorted(set(config.self_attn_layers).intersection(*map(set, config.configurations))))
        can_route = config.router_layer < config.num_layers
        state.routing_pending = [c is None and can_route for c in configurations]
        state.set_configurations([always if c is None else c for c in configurations])

    def route_samples(self, streams: VisorStreams, state: VisorPromptState, input_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """The router picks a configuration for the samples whose budget is "auto", from their routing tokens' hidden
        states. Several questions in a sample: the most expensive configuration any of them asks for."""
        config = self.config
        is_routing = input_ids.gather(1, streams.text_index) == config.routing_token_id  # (B, Nt)
        logits = self.router(streams.text)  # (B, Nt, num_configurations)
        # Configurations are ordered by cost, so a larger index costs more. One copy to the host for all samples, as
        # plain lists (under torch.compile, one graph break).
        choice, is_routing_host = torch.stack([logits.argmax(-1), is_routing.long()]).tolist()
        fallback = self._resolve_one_budget(config.default_budget if config.default_budget != "auto" else "full")
        configurations = list(state.configurations)
        for b, pending in enumerate(state.routing_pending):
            if pending:
                picks = [pick for pick, routes in zip(choice[b], is_routing_host[b]) if routes]
                configurations[b] = tuple(config.configurations[max(picks)]) if picks else fallback
        state.routing_pending = [False] * len(configurations)
        state.set_configurations(configurations)
        return logits, is_routing

    # ---- decode: new text tokens continue from the cache ---------------------------------------------

    def decode_streams(self, input_ids, inputs_embeds, attention_mask, position_ids, state: VisorPromptState) -> VisorStreams:
        """The Q new tokens as a text stream; the state takes them in. Visual tokens are only read from the cache."""
        batch, num_new = input_ids.shape
        embeds = inputs_embeds if inputs_embeds is not None else self.language_model.embed_tokens(input_ids)
        static = state.decoded is not None  # a static cache: no host sync, fixed shapes (see make_static)
        if attention_mask is None:
            new_valid = torch.ones_like(input_ids, dtype=torch.bool)
        elif attention_mask.shape[1] in (state.seq_length + num_new, num_new) or (static and attention_mask.shape[1] > num_new):
            new_valid = attention_mask[:, -num_new:].bool()
        else:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns; expected {state.seq_length + num_new} "
                f"(prompt and generated tokens) or {num_new} (the new tokens)"
            )
        all_valid = None
        if not static:  # both read in one host sync
            has_image_token, all_valid = torch.stack([(input_ids == self.config.image_token_id).any(), new_valid.all()]).tolist()
            if has_image_token:
                raise ValueError("image placeholder tokens can only appear in the prompt, not after it")
        if position_ids is None:
            start = state.seq_length + (state.decoded if static else 0)
            position_ids = (torch.arange(num_new, device=input_ids.device) + start).expand(batch, -1)
        state.append(new_valid, all_valid)
        rope = self.language_model.rotary_emb(embeds, position_ids)
        return VisorStreams(text=embeds, text_rope=rope, cross_mask=state.cross_mask(num_new))


class VisorForConditionalGeneration(VisorPreTrainedModel, GenerationMixin):
    """VISOR with a language-model head. Inputs are LLaVA-OneVision's; `budget` picks the configuration:
    "auto" (router), "full", an int k, a tuple of layers, or a list with one of these per sample."""

    # 5.x maps each tied weight to its source; 4.57 lists them
    _tied_weights_keys = (
        {"lm_head.weight": "model.language_model.embed_tokens.weight"} if TRANSFORMERS_V5 else ["lm_head.weight"]
    )

    def __init__(self, config: VisorConfig):
        super().__init__(config)
        self.model = VisorModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: VisorCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        budget=None,
        batch_num_images: torch.LongTensor | None = None,
        cache: VisorCache | None = None,
        route_only: bool = False,
        token_reduction=None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        **kwargs,
    ) -> VisorCausalLMOutput:
        r"""budget: see the class docstring. route_only: stop after the router and return only
        `self_attn_layers`, `router_logits` and `routing_mask` (router training goes through here, so that
        DDP and friends see a forward of the wrapped model)."""
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, budget=budget, batch_num_images=batch_num_images, cache=cache, route_only=route_only,
            token_reduction=token_reduction, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            pixel_values_videos=pixel_values_videos,
        )
        if route_only:
            return VisorCausalLMOutput(
                self_attn_layers=outputs.self_attn_layers, router_logits=outputs.router_logits,
                routing_mask=outputs.routing_mask,
            )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:  # num_items_in_batch (from Trainer) scales the loss right under gradient accumulation
            loss_kwargs = {k: v for k, v in kwargs.items() if k == "num_items_in_batch" and v is not None}
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **loss_kwargs
            )
        return VisorCausalLMOutput(
            loss=loss, logits=logits, **{CACHE_FIELD: outputs[CACHE_FIELD] if CACHE_FIELD in outputs else None},
            self_attn_layers=outputs.self_attn_layers, router_logits=outputs.router_logits,
            hidden_states=outputs.hidden_states,
        )

    @torch.no_grad()
    def route(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, **kwargs) -> list[tuple[int, ...]]:
        """The configuration the router picks for each sample, without running the layers after it."""
        out = self(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=attention_mask,
            use_cache=False, budget="auto", route_only=True, **kwargs,
        )
        return out.self_attn_layers

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, cache=None, **kwargs):
        """Images and videos are read at prefill only: drop them once the cache holds the prompt (4.57 passes them at
        every step otherwise), and keep them until it does (5.x drops them after the first iteration of a generate
        call, which is not the prefill of an assistant model's cache)."""
        prompt_done = any(isinstance(c, VisorCache) and c.prompt is not None for c in (past_key_values, cache))
        cache_kwargs = {CACHE_FIELD: cache if cache is not None else past_key_values}
        model_inputs = super().prepare_inputs_for_generation(input_ids, **cache_kwargs, **kwargs)
        for name in ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos"):
            if prompt_done:
                model_inputs.pop(name, None)
            elif kwargs.get(name) is not None:  # 5.x drops them after its first iteration (an assistant's prefill)
                model_inputs[name] = kwargs[name]
        return model_inputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        """`generate(cache_implementation="static")` gets a static `VisorCache` (preallocated for `max_cache_length`
        positions once the prompt is in, fixed shapes while decoding; see `VisorCache.make_static`); any other
        choice is transformers' own, and VISOR's forward replaces a cache it cannot use by a dynamic `VisorCache`."""
        if generation_config.cache_implementation == "static" and model_kwargs.get(CACHE_FIELD) is None:
            model_kwargs[CACHE_FIELD] = VisorCache(max_cache_len=max_cache_length)
            return
        return super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and num_return_sequences repeat each sample `expand_size` times; a per-sample list of
        budgets is repeated with it (transformers expands only tensors). A static method in 4.57, a method in 5.x:
        called through super() either way."""
        budget = model_kwargs.get("budget")
        if isinstance(budget, list) and expand_size > 1:
            model_kwargs["budget"] = [b for b in budget for _ in range(expand_size)]
        return super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )

    @classmethod
    def from_llava_onevision(
        cls, llava_model, cross_attn_layers=None, self_attn_layers=None, configurations=None, **config_overrides
    ) -> "VisorForConditionalGeneration":
        """Graft VISOR onto an in-memory transformers `LlavaOnevisionForConditionalGeneration`.

        Every LLaVA-OneVision weight is copied unchanged (same key names); the new parts start as identity.
        The cross-attention projections start from the same layer's self-attention projections (a warm start
        that the zero gate keeps inert until trained).
        """
        config = VisorConfig.from_llava_onevision_config(
            llava_model.config, cross_attn_layers=cross_attn_layers, self_attn_layers=self_attn_layers,
            configurations=configurations, **config_overrides,
        )
        config.text_config._attn_implementation = llava_model.config.text_config._attn_implementation
        config._attn_implementation = llava_model.config._attn_implementation
        dtype = next(llava_model.parameters()).dtype
        model = cls(config).to(dtype)
        source = llava_model.state_dict()
        target = model.state_dict()
        missing = [k for k in source if k not in target]
        if missing:
            raise ValueError(f"LLaVA-OneVision keys with no place in VISOR: {missing[:5]}")
        for key, tensor in source.items():
            if target[key].shape != tensor.shape:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} in LLaVA-OneVision, {tuple(target[key].shape)} in VISOR")
        model.load_state_dict(source, strict=False)
        model.init_new_parameters()
        if config.tie_word_embeddings:
            model.tie_weights()
        return model.to(next(llava_model.parameters()).device)


class VisorImageTextToTextPipeline(ImageTextToTextPipeline):
    """transformers' image-text-to-text pipeline, plus VISOR's call arguments `budget` and `token_reduction`, handed to
    `generate` (the stock pipeline gives unknown call arguments to the processor, or drops them). `config.json`'s
    `custom_pipelines` names it, so `pipeline("image-text-to-text", model=PATH, trust_remote_code=True)` uses it."""

    def _sanitize_parameters(self, *args, budget=None, token_reduction=None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(*args, **kwargs)
        extra = {name: value for name, value in (("budget", budget), ("token_reduction", token_reduction)) if value is not None}
        if extra:
            generate_kwargs = dict(forward.get("generate_kwargs") or {})
            both = sorted(set(extra) & set(generate_kwargs))
            if both:
                raise ValueError(f"{both} given twice: as a call argument and in generate_kwargs; give it once")
            forward["generate_kwargs"] = {**generate_kwargs, **extra}
        return preprocess, forward, postprocess


__all__ = [
    "VisorModel", "VisorForConditionalGeneration", "VisorPreTrainedModel", "VisorCache", "VisorImageTextToTextPipeline",
]
