"""Peak memory of `python -m visor_hf.convert_llava_ov` on a LLaVA-OneVision-0.5B-shaped random checkpoint.

The source has Qwen2-0.5B's text dimensions (24 layers, hidden 896, 14 heads, 2 KV heads, MLP 4864, vocab 151,936,
tied embeddings) and a small SigLIP (384 px crops of 14 px patches, 4 layers of width 256), written in transformers
4.x's on-disk layout as one safetensors file, with a tokenizer and an image processor. Each conversion runs in a
fresh process, measured two ways: `resource.getrusage` max RSS reported by the converting process itself, and
`/usr/bin/time -v` around it when present. A process that only imports the converter gives the fixed overhead.

Usage:
    python benchmarks/bench_convert.py --workdir /tmp/bench_convert [--dtype bfloat16] [--keep]
Prints a Markdown table (the one in BENCHMARKS.md, "Conversion").
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MEASURE = r"""
import resource, sys, time
start = time.perf_counter()
from visor_hf.convert_llava_ov import main
if sys.argv[1:]:
    main(sys.argv[1:])
print("SECONDS", time.perf_counter() - start)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def build_source(folder: Path, dtype: torch.dtype) -> None:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from visor_hf.testing import IMAGE_TOKEN_ID, save_llava_onevision, tiny_image_processor, tiny_tokenizer

    text_config = dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vision_config = dict(
        model_type="siglip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, image_size=384, patch_size=14, vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).to(dtype)
    # The tokenizer needs only <image> at image_token_index: the routing token then takes a spare row, as with Qwen2.
    save_llava_onevision(model, folder, layout="legacy", tokenizer=tiny_tokenizer(256), image_processor=tiny_image_processor(config))


def measure(args: list[str], env: dict) -> dict:
    command = [sys.executable, "-c", MEASURE, *args]
    timed = Path("/usr/bin/time").is_file()
    if timed:
        command = ["/usr/bin/time", "-v", *command]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = {
        "seconds": float(re.search(r"SECONDS (\S+)", proc.stdout).group(1)),
        "maxrss": int(re.search(r"MAXRSS_KB (\d+)", proc.stdout).group(1)) * 1024,
    }
    if timed:
        result["time_v_maxrss"] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    return result


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    parser.add_argument("--source-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    source = workdir / "llava-ov-0.5b-random"
    start = time.perf_counter()
    build_source(source, getattr(torch, args.source_dtype))
    print(f"source written in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    gib = 2**30
    rows = []
    baseline = measure([], env)
    rows.append(("import only (no conversion)", "-", "-", baseline))
    runs = [("default (source dtype)", []), ("--dtype float32", ["--dtype", "float32"]),
            ("--max-shard-size 500MB", ["--max-shard-size", "500MB"])]
    for name, extra in runs:
        dst = workdir / re.sub(r"\W+", "_", name)
        result = measure(["--src", str(source), "--dst", str(dst), "--no-progress", *extra], env)
        rows.append((name, f"{folder_bytes(source) / gib:.2f}", f"{folder_bytes(dst) / gib:.2f}", result))
        shutil.rmtree(dst)

    print(f"\nMachine: {platform.platform()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / gib:.0f} GiB RAM, Python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {__import__('transformers').__version__}\n")
    print("| run | source weights (GiB) | written weights (GiB) | peak RSS, getrusage (GiB) | peak RSS, /usr/bin/time -v (GiB) | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, src_size, dst_size, r in rows:
        timed = f"{r['time_v_maxrss'] / gib:.2f}" if "time_v_maxrss" in r else "-"
        print(f"| {name} | {src_size} | {dst_size} | {r['maxrss'] / gib:.2f} | {timed} | {r['seconds']:.1f} |")
    if not args.keep:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
