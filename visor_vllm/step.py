"""What one vLLM forward step holds, request by request, as VISOR's attention needs it.

vLLM hands a model a flat batch: the text tokens of every scheduled request one after another (whole prompts at
prefill, since encoder-decoder mode has no chunked prefill and no prefix caching; one or a few tokens per request
at decode) and, at prefill, the visual tokens of the prompts that have images (`encoder_outputs`, in batch order).
`StepLayout.current` reads the per-request split from vLLM's attention metadata once per step:

- a request is a prompt when its sequence length equals its query length;
- a prompt's text token at decoder index i may read the visual tokens before it (image-causal cross-attention): row 1
  of its positions minus i (`VisorForConditionalGeneration.get_mrope_input_positions`); row 0 is its RoPE position;
- visual token e of a prompt follows the text tokens that read fewer than e + 1 visual tokens;
- the encoder length (visual tokens of the request) comes from a cross-attention layer's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm.forward_context import get_forward_context, is_forward_context_available


@dataclass
class RequestRows:
    """One request of the step."""

    index: int  # its row in the step's block tables
    rows: slice  # its text tokens in the step's flat batch
    is_prompt: bool
    seq_len: int  # text tokens in its sequence so far, this step's included
    encoder_len: int  # its visual tokens
    visual: slice | None = None  # prompts with images: their visual tokens in the step's encoder output
    visible: torch.Tensor | None = None  # prompts: visual tokens each text token may read, (num_rows,)

    def text_before_visual(self) -> torch.Tensor:
        """Per visual token e of a prompt, the text tokens before it: those that read fewer than e + 1 visual tokens
        (`visible` is non-decreasing)."""
        index = torch.arange(self.encoder_len, device=self.visible.device)
        return torch.searchsorted(self.visible, index, right=True)

    def visual_order(self) -> torch.Tensor:
        """Where a prompt's visual tokens sit among its text and (kept) visual tokens, for ordering them."""
        return torch.arange(self.encoder_len, device=self.visible.device) + self.text_before_visual()

    def visual_rope_positions(self, full_index: torch.Tensor) -> torch.Tensor:
        """RoPE positions of a prompt's visual tokens in the dense sequence: `full_index` (N,), each token's index among
        the prompt's visual tokens before token reduction, plus the text tokens before it."""
        return full_index + self.text_before_visual()


@dataclass
class StepLayout:
    """The requests of one forward step (see the module docstring)."""

    requests: list[RequestRows]
    num_text: int
    num_visual: int  # visual tokens brought by this step's prompts

    @classmethod
    def current(cls, text_layer: str, cross_layer: str, positions: torch.Tensor) -> "StepLayout | None":
        """The running step's layout, from the metadata of one text layer and one cross-attention layer and the
        positions (3, N) the model computed; None outside a step with attention metadata (vLLM's profiling runs)."""
        if not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict) or text_layer not in metadata or cross_layer not in metadata:
            return None
        starts = metadata[text_layer].query_start_loc.tolist()
        num_requests = len(starts) - 1
        seq_lens = metadata[text_layer].seq_lens[:num_requests].tolist()
        encoder_lens = metadata[cross_layer].seq_lens[:num_requests].tolist()
        requests, visual_start = [], 0
        for index, (start, end, seq_len, encoder_len) in enumerate(zip(starts, starts[1:], seq_lens, encoder_lens)):
            request = RequestRows(index, slice(start, end), seq_len == end - start, seq_len, encoder_len)
            if request.is_prompt:
                request.visible = positions[1, start:end] - torch.arange(end - start, device=positions.device)
                if encoder_len:
                    request.visual = slice(visual_start, visual_start + encoder_len)
                    visual_start += encoder_len
            requests.append(request)
        return cls(requests, starts[-1], visual_start)


def grouped_attention(query, key, value, num_kv_heads: int, scale: float, allowed=None, causal: bool = False):
    """Attention of one request with grouped-query heads: query (Q, h * d), key/value (K, kvh * d); `allowed` (Q, K),
    True = may attend, or `causal` (the Q queries are the last Q keys). Returns (Q, h * d); a query with no key it may
    read gets zeros."""
    num_queries, num_keys = query.shape[0], key.shape[0]
    head_dim = key.shape[1] // num_kv_heads
    num_heads = query.shape[1] // head_dim
    q = query.view(num_queries, num_heads, head_dim).transpose(0, 1)  # (h, Q, d)
    k = key.view(num_keys, num_kv_heads, head_dim).transpose(0, 1)  # (kvh, K, d)
    v = value.view(num_keys, num_kv_heads, head_dim).transpose(0, 1)
    if causal:
        allowed = torch.ones(num_queries, num_keys, dtype=torch.bool, device=query.device).tril(num_keys - num_queries)
    if allowed is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=num_heads > num_kv_heads)
        return out.transpose(0, 1).reshape(num_queries, -1)
    has_key = allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(allowed | ~has_key)[None], scale=scale,
                                         enable_gqa=num_heads > num_kv_heads)
    return (out * has_key.to(out.dtype)).transpose(0, 1).reshape(num_queries, -1)
