"""KV-cache memory of one image request: VISOR served by this plugin against vLLM's in-tree LLaVA-OneVision on the
same weights, from vLLM's own KV-cache configuration.

How vLLM spends KV memory (v1, hybrid allocator): layers are grouped (`KVCacheGroupSpec`), a request holds
cdiv(tokens, block_size) blocks in each group (decoder tokens for a full-attention group, encoder tokens for a
cross-attention group), and one block of a group takes one page (`spec.page_size_bytes`) in each of the group's
layer slots. LLaVA-OneVision in vLLM is one group of all its layers over text + visual tokens.

- `engine_groups(llm)`: the groups of a running engine (what `vllm serve` allocates).
- `planned_groups(llm, specs)`: the groups vLLM's planner (`get_kv_cache_groups`) makes of any per-layer specs, e.g. a
  larger model's, with the running engine's settings.

Usage (prints a markdown table; the engine runs on the CPU backend):
    python -m visor_vllm.kv_memory DIR [--self-attn-layers 3,5] [--image 64x64] [--text-tokens 40]
    python -m visor_vllm.kv_memory DIR --llava-ov-0.5b --image 2304x2304   # LLaVA-OV-0.5B's geometry, 8 + 8 layers
"""

from __future__ import annotations

import argparse
import os

import torch

from visor_hf.configuration_visor import num_visual_tokens


def blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def request_bytes(groups, num_text: int, num_visual: int) -> int:
    """KV bytes one request holds: `groups` is [(spec, layer slots)]; cross-attention groups count visual tokens."""
    from vllm.v1.kv_cache_interface import CrossAttentionSpec

    total = 0
    for spec, slots in groups:
        tokens = num_visual if isinstance(spec, CrossAttentionSpec) else num_text
        total += blocks(tokens, spec.block_size) * spec.page_size_bytes * slots
    return total


def dense_llava_bytes(text_spec, num_layers: int, num_text: int, num_visual: int) -> int:
    """vLLM's in-tree LLaVA-OneVision: every layer a full-attention layer over text + visual tokens (one group)."""
    return blocks(num_text + num_visual, text_spec.block_size) * text_spec.page_size_bytes * num_layers


def engine_groups(llm) -> list:
    """[(spec, layer slots)] of a running engine's KV-cache groups."""
    return llm.collective_rpc(lambda worker: [
        (group.kv_cache_spec, len(group.layer_names)) for group in worker.model_runner.kv_cache_config.kv_cache_groups
    ])[0]


def planned_groups(llm, specs: dict) -> list:
    """[(spec, layer slots)] vLLM's planner makes of per-layer `specs`, with the running engine's settings."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_groups

    groups = get_kv_cache_groups(llm.llm_engine.vllm_config, dict(specs))
    return [(group.kv_cache_spec, len(group.layer_names)) for group in groups]


def visor_specs(num_layers: int, cross_layers, self_attn_layers, num_kv_heads: int, head_size: int, block_size: int,
                dtype: torch.dtype) -> dict:
    """Per-layer specs of VISOR as this plugin declares them: every text layer full attention, every cross-attention
    layer and the visual part of every layer of S a cross-attention cache."""
    from vllm.v1.kv_cache_interface import CrossAttentionSpec, FullAttentionSpec

    shape = dict(block_size=block_size, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)
    specs = {f"layers.{i}": FullAttentionSpec(**shape) for i in range(num_layers)}
    specs.update({f"cross_attn.{i}": CrossAttentionSpec(**shape) for i in cross_layers})
    specs.update({f"layers.{i}.visual": CrossAttentionSpec(**shape) for i in self_attn_layers})
    return specs


def llava_ov_05b_rows(llm, image: str):
    """VISOR on LLaVA-OV-0.5B's geometry (24 layers, 2 KV heads of 64, bf16; SigLIP-384/14, anyres_max_9; the default
    8 cross-attention and 8 self-attention layers), groups planned by vLLM with the running engine's block size:
    [(name, groups, visual tokens cached)], the layer count, the image's visual tokens and the text layers' spec."""
    from visor_hf.configuration_visor import VisorConfig
    from visor_hf.flops import token_reduction_counts

    config = VisorConfig(text_config={"model_type": "qwen2", "num_hidden_layers": 24})  # SigLIP-384/14 by default
    cross, selfs = config.cross_attn_layers, config.self_attn_layers
    width, height = (int(x) for x in image.split("x"))
    num_visual = num_visual_tokens(config, (height, width))
    zip25 = token_reduction_counts(config, (height, width), {"method": "visionzip", "keep_ratio": 0.25})["kept"]
    block = engine_groups(llm)[0][0].block_size
    specs = lambda s: visor_specs(24, cross, s, 2, 64, block, torch.bfloat16)
    rows = [
        (f"VISOR budget 0 (|C| = {len(cross)})", planned_groups(llm, specs([])), num_visual),
        (f"VISOR S = {selfs}", planned_groups(llm, specs(selfs)), num_visual),
        (f"VISOR budget 0 + VisionZip 25% ({zip25} visual tokens)", planned_groups(llm, specs([])), zip25),
    ]
    return rows, 24, num_visual, specs([])["layers.0"]


def table(rows) -> str:
    lines = ["| model | per-request KV (bytes) | vs LLaVA-OV |", "| --- | ---: | ---: |"]
    dense = rows[0][1]
    lines += [f"| {name} | {value:,} | {value / dense:.2f} |" for name, value in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--self-attn-layers", default="", help="the served S, comma-separated (default: budget 0)")
    parser.add_argument("--image", default="64x64", help="image size WIDTHxHEIGHT")
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--llava-ov-0.5b", dest="llava_ov_05b", action="store_true",
                        help="LLaVA-OV-0.5B's geometry (24 layers, 2 KV heads of 64, bf16, SigLIP-384/14 anyres_max_9)")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    self_attn_layers = [int(i) for i in args.self_attn_layers.split(",") if i]
    llm = LLM(model=args.checkpoint, hf_overrides={"serve_self_attn_layers": self_attn_layers}, max_model_len=512,
              max_num_batched_tokens=1024, enforce_eager=True, gpu_memory_utilization=0.1,
              kv_cache_memory_bytes=32 << 20)
    config = llm.llm_engine.vllm_config.model_config.hf_config
    text_spec = next(spec for spec, _ in engine_groups(llm) if type(spec).__name__ == "FullAttentionSpec")
    if args.llava_ov_05b:
        rows, num_layers, num_visual, text_spec = llava_ov_05b_rows(llm, args.image)
    else:
        num_layers = config.num_layers
        width, height = (int(x) for x in args.image.split("x"))
        num_visual = num_visual_tokens(config, (height, width))
        rows = [(f"VISOR, S = {self_attn_layers} (this engine)", engine_groups(llm), num_visual)]
    num_text = args.text_tokens
    results = [("vLLM in-tree LLaVA-OV (dense)", dense_llava_bytes(text_spec, num_layers, num_text, num_visual))]
    results += [(name, request_bytes(groups, num_text, kept)) for name, groups, kept in rows]
    print(f"{num_text} text tokens, {num_visual} visual tokens, block size {text_spec.block_size}, "
          f"page {text_spec.page_size_bytes:,} bytes")
    print(table(results))


if __name__ == "__main__":
    main()
