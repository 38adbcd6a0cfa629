"""VISOR (VISion On Request) as a vLLM encoder-decoder model, with a fixed self-attention set S chosen at launch
(`serve_self_attn_layers`; empty = budget 0).

    encoder:  pixels --SigLIP--projector--anyres pack (+image_newline)[--token reduction]--> V
              (embed_multimodal: one encoder input per prompt, its images one after another)
    decoder:  text tokens only, at LLaVA-OneVision's dense RoPE positions
              for layer l:  if l in S: [V; T] = Qwen2Layer_l([V; T])  (dense order; KV: text cache + visual cache)
                            else:      T      = Qwen2Layer_l(T)       (KV cache: text only)
                            if l in cross_attn_layers: T = T + tanh(g_l) * XAttn_l(T, CPE_l(V))   (KV cache: V once)

Design choices:
- vLLM's own pieces where they exist: `Qwen2DecoderLayer` (paged KV cache, `FullAttentionSpec`), `CrossAttention`
  (`CrossAttentionSpec`, sized by the encoder length and written once at prefill). The visual tokens are made by
  `visor_hf`'s own code on transformers' SigLIP and projector (`VisorVisionEncoder`), so they are `visor_hf`'s, token
  reduction included; the CPE is `visor_hf`'s module. vLLM's llava modules are not imported (they need torchvision).
- Positions: the decoder prompt has no image placeholders, so vLLM's positions would be wrong. The model computes
  each prompt's positions itself through vLLM's M-RoPE hook (`get_mrope_input_positions`): row 0 is the dense RoPE
  position, which the text layers read; decoding continues at `+ all visual tokens`.
- Image-causal cross-attention: a text token reads only the images placed before it in the prompt (text before the
  first image reads none). At prefill, the number of visual tokens a text token may read is row 1 of its positions
  minus its index in the decoder prompt (`step.StepLayout`); those rows are recomputed from the fresh keys/values with
  that mask (prefill is never chunked in vLLM's encoder-decoder mode). At decode every image precedes the new token, so vLLM's cached
  cross-attention is exact. A request without images reads nothing: its cross-attention output is zero.
- A layer of S is the same `Qwen2DecoderLayer`, called on the text and visual rows, with its attention module
  replaced by `dense_attention.DenseAttention` (text keys in the layer's cache, visual keys in a cross-attention-type
  cache; dense causal attention at prefill, attention over both caches at decode).
- Weight loading maps `visor_hf`'s checkpoint names onto the fused vLLM parameters and checks every tensor; the
  router's weights are read and ignored (the budget is fixed at launch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    LlavaOnevisionMultiModalProjector,
)

from visor_hf.modeling_visor import VisorCPE, VisorTokenPacker
from visor_hf.modeling_visor import VisorModel as VisorHFModel
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import CrossAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
from vllm.multimodal import MULTIMODAL_REGISTRY

from .config import served_self_attn_layers, served_token_reduction
from .dense_attention import DenseAttention
from .processing import VisorDummyInputsBuilder, VisorMultiModalProcessor, VisorProcessingInfo
from .step import StepLayout, grouped_attention

# --------------------------------------------------------------------------------------------------
# Encoder: SigLIP + projector + anyres packing
# --------------------------------------------------------------------------------------------------


class VisorVisionEncoder(nn.Module):
    """LLaVA-OneVision's visual tokens of a prompt's images, made by `visor_hf`'s own code (`VisorModel.visual_features`,
    `VisorModel.reduce_visual_tokens`, which run transformers' `get_image_features` and `pack_image_features`), so they
    are `visor_hf`'s tokens exactly.

    Holds what that code reads: the checkpoint's `vision_tower`, `multi_modal_projector`, `image_newline` (names
    unchanged), `token_packer` (VISOR-TR packing, when the deployment packs) and `config`."""

    pack_image_features = LlavaOnevisionModel.pack_image_features

    def __init__(self, config, token_reduction: dict | None):
        super().__init__()
        self.config = config
        self.token_reduction = token_reduction
        # in the served dtype (vLLM sets it as the default while it builds the model), not the config's
        self.vision_tower = AutoModel.from_config(config.vision_config, dtype=torch.get_default_dtype())
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        if token_reduction is not None and token_reduction["method"] == "pack":
            self.token_packer = VisorTokenPacker(config.text_config.hidden_size, token_reduction["pack_factor"])
        if token_reduction is not None:  # visor_hf's checks: the packer's factor, the scoring layer's range
            VisorHFModel.resolve_token_reduction(self, token_reduction)

    def forward(self, crops: torch.Tensor, image_sizes: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """crops (num_crops, 3, H, W) of a prompt's images of `image_sizes` (n, 2) -> per image its kept visual tokens
        (N_i, hidden) and their positions among the image's tokens before reduction (N_i,)."""
        batch_num_images = torch.tensor([image_sizes.shape[0]])
        if self.token_reduction is None:
            features = VisorHFModel.visual_features(self, crops, image_sizes, batch_num_images)
            return [(f, torch.arange(f.shape[0], device=f.device)) for f in features]
        reduced, kept = VisorHFModel.reduce_visual_tokens(self, crops, image_sizes, batch_num_images, self.token_reduction)
        return [(f, torch.nonzero(mask).flatten()) for f, mask in zip(reduced, kept)]


# --------------------------------------------------------------------------------------------------
# Decoder: Qwen2 layers (text only) and gated cross-attention
# --------------------------------------------------------------------------------------------------


class VisorCrossAttention(nn.Module):
    """Gated cross-attention: text queries read CPE(V)'s keys/values, cached once by vLLM's `CrossAttention`.
    Parameter names are `visor_hf`'s, with k_proj/v_proj fused into `kv_proj`."""

    def __init__(self, text_config, cpe_kernel_size: int, cache_config, quant_config, prefix: str):
        super().__init__()
        hidden = text_config.hidden_size
        self.num_heads = text_config.num_attention_heads
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or hidden // self.num_heads
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.cpe = VisorCPE(hidden, cpe_kernel_size)
        self.visual_norm = RMSNorm(hidden, eps=text_config.rms_norm_eps)
        self.text_norm = RMSNorm(hidden, eps=text_config.rms_norm_eps)
        self.q_proj = ColumnParallelLinear(hidden, self.num_heads * self.head_dim, bias=True, quant_config=quant_config,
                                           prefix=f"{prefix}.q_proj")
        self.kv_proj = MergedColumnParallelLinear(hidden, [self.kv_size] * 2, bias=True, quant_config=quant_config,
                                                  prefix=f"{prefix}.kv_proj")
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, hidden, bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self.gate = nn.Parameter(torch.zeros(1))
        self.attn = CrossAttention(self.num_heads, self.head_dim, self.scale, num_kv_heads=self.num_kv_heads,
                                   cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, text: torch.Tensor, visual: "VisualTokens | None", layout: StepLayout | None) -> torch.Tensor:
        """text (N, hidden) of the step's tokens; `visual`: the step's new visual tokens (prefill), else None."""
        query, _ = self.q_proj(self.text_norm(text))
        key = value = None
        if visual is not None:
            tokens = self.cpe(visual.tokens[None], visual.image_ids[None])[0]
            kv, _ = self.kv_proj(self.visual_norm(tokens))
            key, value = kv.split([self.kv_size, self.kv_size], dim=-1)
        out = self.attn(query, key, value)  # writes the visual keys/values at prefill; reads them at decode
        if layout is not None:
            out = self.image_causal(out, query, key, value, layout)
        out, _ = self.o_proj(out)
        return text + torch.tanh(self.gate).to(text.dtype) * out

    def image_causal(self, out, query, key, value, layout: StepLayout) -> torch.Tensor:
        """Prompt rows read only the images before them (recomputed from the fresh keys/values); requests without
        visual tokens read nothing."""
        out = out.clone()
        for request in layout.requests:
            if request.encoder_len == 0:
                out[request.rows] = 0
            elif request.is_prompt:
                rows, visual = request.rows, request.visual
                allowed = torch.arange(request.encoder_len, device=query.device)[None, :] < request.visible[:, None]
                out[rows] = grouped_attention(query[rows], key[visual], value[visual], self.num_kv_heads, self.scale,
                                              allowed=allowed)
        return out


@dataclass
class VisualTokens:
    """The visual tokens a step's prompts bring, concatenated in batch order: which image each belongs to (the CPE
    never mixes two images) and its index among its prompt's visual tokens before token reduction (its RoPE position
    is that plus the text tokens before it)."""

    tokens: torch.Tensor  # (N, hidden)
    image_ids: torch.Tensor  # (N,)
    full_index: torch.Tensor  # (N,)

    @classmethod
    def of(cls, encoder_outputs: list[torch.Tensor] | None, dtype: torch.dtype) -> "VisualTokens | None":
        """From `embed_multimodal`'s outputs (one per prompt; see there)."""
        if not encoder_outputs:
            return None
        tokens, image_ids, full_index, first_id = [], [], [], 0
        for output in encoder_outputs:
            index = output[:, -1].round().long()
            tokens.append(output[:, :-2].to(dtype))
            full_index.append(output[:, -2].round().long())
            image_ids.append(index + first_id)
            first_id += int(index.max()) + 1
        return cls(torch.cat(tokens), torch.cat(image_ids), torch.cat(full_index))

    def replace_tokens(self, tokens: torch.Tensor) -> "VisualTokens":
        return VisualTokens(tokens, self.image_ids, self.full_index)


class VisorTextModel(nn.Module):
    """The Qwen2 language model (`embed_tokens`, `layers`, `norm`): vLLM's decoder layers. The layers of the served
    self-attention set S get a `DenseAttention` (text and visual keys/values); the others see text tokens only."""

    def __init__(self, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        text_config = config.text_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(text_config.vocab_size, text_config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(text_config, cache_config, quant_config, prefix=f"{prefix}.layers.{i}")
            for i in range(text_config.num_hidden_layers)
        )
        self.norm = RMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
        self.dense_layers = frozenset(served_self_attn_layers(config))
        for index in self.dense_layers:
            attention = self.layers[index].self_attn
            attention.attn = DenseAttention(attention.attn, attention.scaling, cache_config,
                                            prefix=f"{prefix}.layers.{index}.self_attn")

    def dense_step(self, index: int, text, residual, visual: "VisualTokens | None", layout, positions):
        """Layer `index` of S: the step's text tokens and its prompts' visual tokens (at their dense positions) through
        the layer; returns the text hidden states (residual added) and the updated visual tokens."""
        layer = self.layers[index]
        hidden = text if residual is None else text + residual
        with_visual = visual is not None and layout is not None and layout.num_visual > 0
        if with_visual:
            visual_positions = torch.cat([
                r.visual_rope_positions(visual.full_index[r.visual]) for r in layout.requests if r.visual is not None
            ])
            hidden, positions = torch.cat([hidden, visual.tokens]), torch.cat([positions, visual_positions])
        layer.self_attn.attn.layout = layout
        try:
            out, residual = layer(positions, hidden, None)
        finally:
            layer.self_attn.attn.layout = None
        out = out + residual
        if not with_visual:
            return out, visual
        return out[: layout.num_text], visual.replace_tokens(out[layout.num_text:])


class VisorModel(nn.Module):
    """The checkpoint's `model.*`: vision encoder parts, language model and cross-attention layers."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "model"):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.vision = VisorVisionEncoder(config, served_token_reduction(config))
        self.language_model = VisorTextModel(vllm_config, prefix=f"{prefix}.language_model")
        self.cross_attn = nn.ModuleDict({
            str(layer): VisorCrossAttention(config.text_config, config.cpe_kernel_size, vllm_config.cache_config,
                                            vllm_config.quant_config, prefix=f"{prefix}.cross_attn.{layer}")
            for layer in config.cross_attn_layers
        })

    def step_layout(self, positions: torch.Tensor) -> StepLayout | None:
        """The step's requests, read from the metadata of a text-token cache and of a visual-token cache."""
        text_layer = self.language_model.layers[0].self_attn.attn
        text_layer = text_layer.text if isinstance(text_layer, DenseAttention) else text_layer
        visual_caches = [c.attn for c in self.cross_attn.values()] + [
            self.language_model.layers[i].self_attn.attn.visual for i in sorted(self.language_model.dense_layers)
        ]
        if not visual_caches:
            return None
        return StepLayout.current(text_layer.layer_name, visual_caches[0].layer_name, positions)

    def forward(self, input_ids, positions, inputs_embeds=None, encoder_outputs=None) -> torch.Tensor:
        """embed -> (Qwen2 layer, then its cross-attention if it has one) per layer -> norm."""
        dense_positions = positions[0] if positions.ndim == 2 else positions
        text = self.language_model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        visual = VisualTokens.of(encoder_outputs, text.dtype)
        layout = self.step_layout(positions)
        residual = None
        language_model = self.language_model
        for index, layer in enumerate(language_model.layers):
            if index in language_model.dense_layers:
                text, visual = language_model.dense_step(index, text, residual, visual, layout, dense_positions)
                residual = None
            else:
                text, residual = layer(dense_positions, text, residual)
            if str(index) in self.cross_attn:
                hidden = text if residual is None else text + residual
                text, residual = self.cross_attn[str(index)](hidden, visual, layout), None
        if residual is None:
            return self.language_model.norm(text)
        return self.language_model.norm(text, residual)[0]


# --------------------------------------------------------------------------------------------------
# The vLLM model class
# --------------------------------------------------------------------------------------------------

# checkpoint name piece -> (parameter name piece, shard id), for the parameters vLLM fuses
FUSED_TEXT_WEIGHTS = {
    ".self_attn.q_proj.": (".self_attn.qkv_proj.", "q"),
    ".self_attn.k_proj.": (".self_attn.qkv_proj.", "k"),
    ".self_attn.v_proj.": (".self_attn.qkv_proj.", "v"),
    ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
    ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
}
FUSED_CROSS_WEIGHTS = {".k_proj.": (".kv_proj.", 0), ".v_proj.": (".kv_proj.", 1)}
IGNORED_PREFIXES = ("model.router.",)  # the router: a fixed budget never asks it
VISION_PARTS = ("vision_tower.", "multi_modal_projector.", "image_newline", "token_packer.")


def parameter_name(name: str, params: Mapping[str, nn.Parameter]) -> tuple[str, str | int | None]:
    """A checkpoint tensor's parameter name in this model, and its shard id in a fused parameter (None if unfused).
    Checkpoints keep SigLIP's `vision_model.` level (4.57's layout); transformers 5's SiglipVisionModel has none."""
    if name.startswith("model.") and name[len("model."):].startswith(VISION_PARTS):
        name = "model.vision." + name[len("model."):]
        if name not in params:
            name = name.replace(".vision_tower.vision_model.", ".vision_tower.")
        return name, None
    fused = FUSED_TEXT_WEIGHTS if name.startswith("model.language_model.layers.") else (
        FUSED_CROSS_WEIGHTS if name.startswith("model.cross_attn.") else {}
    )
    for piece, (target, shard) in fused.items():
        if piece in name:
            return name.replace(piece, target), shard
    return name, None


def check_served(vllm_config: VllmConfig) -> None:
    """Refuse what this plugin does not serve, rather than serve something else."""
    if vllm_config.parallel_config.tensor_parallel_size > 1:
        raise NotImplementedError("tensor parallelism is not served by visor_vllm yet (use tensor_parallel_size=1)")


@MULTIMODAL_REGISTRY.register_processor(
    VisorMultiModalProcessor, info=VisorProcessingInfo, dummy_inputs=VisorDummyInputsBuilder
)
class VisorForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsMRoPE):
    """VISOR served by vLLM as an encoder-decoder model (see the module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_served(vllm_config)
        self.config = config
        self.model = VisorModel(vllm_config, prefix="model")
        text_config = config.text_config
        self.lm_head = ParallelLMHead(text_config.vocab_size, text_config.hidden_size, prefix="lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.language_model.embed_tokens)
        self.logits_processor = LogitsProcessor(text_config.vocab_size)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"VISOR takes images only, not {modality}")

    def get_language_model(self) -> nn.Module:
        return self.model.language_model

    # ---- positions ------------------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """Per decoder token: row 0, its position in LLaVA-OneVision's dense sequence (index + visual tokens of the
        images before it, before token reduction: RoPE); row 1, index + the visual tokens it may read (after
        reduction: the image-causal cross-attention, `StepLayout`); row 2 = row 0. Decoding continues at index + all
        visual tokens on every row (M-RoPE's delta); the new tokens read every visual token, so row 1 is not read."""
        num_tokens = len(input_tokens)
        full, kept = torch.zeros(num_tokens + 1, dtype=torch.long), torch.zeros(num_tokens + 1, dtype=torch.long)
        for feature in mm_features:  # one feature: all images of the prompt
            full.index_add_(0, feature.data["text_offset"].data, feature.data["num_visual_tokens"].data)
            kept.index_add_(0, feature.data["text_offset"].data, feature.data["num_kept_tokens"].data)
        index = torch.arange(num_tokens)
        dense = index + torch.cumsum(full, 0)[:num_tokens]
        return torch.stack([dense, index + torch.cumsum(kept, 0)[:num_tokens], dense]), int(full.sum())

    # ---- encoder ---------------------------------------------------------------------------------

    def embed_multimodal(self, **kwargs) -> tuple[torch.Tensor, ...]:
        """One float32 tensor per item (the images of one prompt), (N, hidden + 2): its kept visual tokens, image after
        image, then two columns, each token's index among the prompt's visual tokens before token reduction and its
        image index. vLLM hands the decoder one tensor per item, and the decoder needs both (RoPE positions of the
        layers of S; the CPE must not mix images); float32 holds them exactly."""
        dtype = self.model.vision.multi_modal_projector.linear_1.weight.dtype
        outputs = []
        for crops, sizes, full_counts in zip(kwargs["pixel_values"], kwargs["image_sizes"], kwargs["num_visual_tokens"]):
            per_image = self.model.vision(crops.to(dtype), sizes)
            starts = torch.cumsum(full_counts, 0) - full_counts  # each image's first token, before reduction
            columns = [
                torch.cat([f.float(), (positions + start)[:, None].float(), torch.full_like(positions, k)[:, None].float()], 1)
                for k, ((f, positions), start) in enumerate(zip(per_image, starts.tolist()))
            ]
            outputs.append(torch.cat(columns))
        return tuple(outputs)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        """The decoder's embeddings: text tokens only (the visual tokens reach the decoder as encoder outputs)."""
        return self.model.language_model.embed_tokens(input_ids)

    # ---- decoder ---------------------------------------------------------------------------------

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, encoder_outputs=None,
                **kwargs) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds, encoder_outputs)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    # ---- weights ---------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a `visor_hf` checkpoint: names mapped (`parameter_name`), every tensor checked, every parameter filled
        (all shards of a fused one); the router's tensors are read and ignored. Raises `ValueError` on an unknown
        name, a shape mismatch or a missing tensor."""
        params = dict(self.named_parameters(remove_duplicate=False))
        expected_shards = {name: 1 for name in params}
        for fused in (FUSED_TEXT_WEIGHTS, FUSED_CROSS_WEIGHTS):
            for name in params:
                for target, _ in fused.values():
                    if target in name:
                        expected_shards[name] = sum(t == target for t, _ in fused.values())
        filled: dict[str, int] = {}
        for checkpoint_name, tensor in weights:
            if checkpoint_name.startswith(IGNORED_PREFIXES):
                continue
            if checkpoint_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            name, shard = parameter_name(checkpoint_name, params)
            if name not in params:
                raise ValueError(f"checkpoint tensor {checkpoint_name!r} (as {name!r}) has no parameter in this model")
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                if loader is default_weight_loader and tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"{checkpoint_name}: shape {tuple(tensor.shape)}, parameter {tuple(param.shape)}")
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            filled[name] = filled.get(name, 0) + 1
        if self.config.tie_word_embeddings:
            filled["lm_head.weight"] = filled.get("model.language_model.embed_tokens.weight", 0)
        missing = sorted(name for name, count in expected_shards.items() if filled.get(name, 0) != count)
        if missing:
            raise ValueError(f"the checkpoint does not fill these parameters (or fills them twice): {missing}")
        return set(params)
