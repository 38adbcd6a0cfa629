"""The attention of a self-attention layer of S (the fixed set of layers that also run on the visual tokens).

Such a layer is the checkpoint's own `Qwen2DecoderLayer`, called on more rows: at prefill the step's text tokens
followed by its prompts' visual tokens (each with its dense RoPE position), at decode the new text tokens. Its
attention module is replaced by `DenseAttention`, which sees those rows' queries, keys and values and:

- caches keys/values in two vLLM-managed caches: the text tokens' in the layer's own cache (`FullAttentionSpec`,
  sized by the text tokens, like every text layer) and the visual tokens' in a `CrossAttention` cache
  (`CrossAttentionSpec`, sized by the encoder length, written once at prefill);
- at prefill, runs causal attention over each prompt's dense sequence [T_pre; V; T_post] from the fresh keys/values
  (prefill is never chunked in vLLM's encoder-decoder mode);
- at decode, reads both caches through the block tables and attends to their union (every visual token and every
  earlier text token precedes the new token). One softmax over the concatenated keys equals the log-sum-exp merge of
  two partial attentions.

The two caches are written and read here, in torch, with one layout of the vLLM CPU backend's per-layer tensor
(blocks, kv heads, block size, 2 * head dim: keys then values); vLLM's kernels never touch them. This is the CPU
path; a GPU path would use the FlashAttention kernels with `return_softmax_lse` and `merge_attn_states`.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import CrossAttention

from .step import StepLayout, grouped_attention


def write_slots(kv_cache: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """key/value (N, kvh * d) into `slots` (N,) of a (blocks, kvh, block size, 2 * d) cache."""
    num_blocks, num_kv_heads, block_size, width = kv_cache.shape
    block, offset = slots // block_size, slots % block_size
    pair = torch.cat([key.view(-1, num_kv_heads, width // 2), value.view(-1, num_kv_heads, width // 2)], dim=-1)
    kv_cache[block, :, offset] = pair.to(kv_cache.dtype)


def read_tokens(kv_cache: torch.Tensor, block_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` tokens of one request's cache (its `block_row` of the block table): key, value (L, kvh * d)."""
    num_blocks, num_kv_heads, block_size, width = kv_cache.shape
    blocks = block_row[: -(-length // block_size)]
    tokens = kv_cache[blocks].permute(0, 2, 1, 3).reshape(-1, num_kv_heads, width)[:length]  # (L, kvh, 2d)
    key, value = tokens.split(width // 2, dim=-1)
    return key.reshape(length, -1), value.reshape(length, -1)


class DenseAttention(nn.Module):
    """Replaces `layer.self_attn.attn` of a layer of S (see the module docstring). `text` is the layer's original
    vLLM `Attention` (kept for its cache and metadata), `visual` a `CrossAttention` for the visual keys/values."""

    def __init__(self, text: nn.Module, scale: float, cache_config, prefix: str):
        super().__init__()
        self.text = text
        self.num_kv_heads, self.scale = text.num_kv_heads, scale
        self.visual = CrossAttention(text.num_heads, text.head_size, self.scale, num_kv_heads=self.num_kv_heads,
                                     cache_config=cache_config, prefix=f"{prefix}.visual_attn")
        self.layout: StepLayout | None = None  # the running step's, set by the model before it calls the layer

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query (N, h * d), key/value (N, kvh * d) of the rows the layer was called on: the step's text tokens, then
        its prompts' visual tokens. Returns (N, h * d)."""
        layout = self.layout
        if layout is None:  # a profiling run: nothing is cached, the output is not used
            return torch.zeros_like(query)
        metadata = get_forward_context().attn_metadata
        text_meta, visual_meta = metadata[self.text.layer_name], metadata[self.visual.layer_name]
        num_text = layout.num_text
        write_slots(self.text.kv_cache, text_meta.slot_mapping[:num_text], key[:num_text], value[:num_text])
        if layout.num_visual:
            slots = visual_meta.slot_mapping
            if slots.shape[0] != layout.num_visual:
                raise ValueError(f"{slots.shape[0]} visual cache slots for {layout.num_visual} visual tokens")
            write_slots(self.visual.kv_cache, slots, key[num_text:], value[num_text:])
        out = torch.empty_like(query)
        for request in layout.requests:
            if request.is_prompt:
                rows = self.dense_rows(request, num_text)
                out[rows] = grouped_attention(query[rows], key[rows], value[rows], self.num_kv_heads, self.scale,
                                              causal=True)
            else:
                out[request.rows] = self.decode(request, query[request.rows], text_meta, visual_meta)
        return out

    @staticmethod
    def dense_rows(request, num_text: int) -> torch.Tensor:
        """A prompt's rows (text rows, then visual rows after `num_text`) in the order of its dense sequence."""
        text_rows = torch.arange(request.rows.start, request.rows.stop, device=request.visible.device)
        if request.visual is None:
            return text_rows
        text_positions = request.visible + torch.arange(text_rows.shape[0], device=text_rows.device)
        visual_rows = torch.arange(request.visual.start, request.visual.stop, device=text_rows.device) + num_text
        rows = torch.cat([text_rows, visual_rows])
        return rows[torch.argsort(torch.cat([text_positions, request.visual_order()]))]

    def decode(self, request, query, text_meta, visual_meta) -> torch.Tensor:
        """New text tokens read every visual token and the text tokens up to themselves, from the two caches."""
        key, value = read_tokens(self.text.kv_cache, text_meta.block_table[request.index], request.seq_len)
        num_visual = request.encoder_len
        if num_visual:
            visual_key, visual_value = read_tokens(self.visual.kv_cache, visual_meta.block_table[request.index], num_visual)
            key, value = torch.cat([visual_key, key]), torch.cat([visual_value, value])
        num_queries, num_keys = query.shape[0], key.shape[0]
        allowed = torch.ones(num_queries, num_keys, dtype=torch.bool, device=query.device).tril(num_keys - num_queries)
        return grouped_attention(query, key, value, self.num_kv_heads, self.scale, allowed=allowed)
