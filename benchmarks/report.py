#!/usr/bin/env python
"""The report step of the benchmarks: a run's rows to markdown tables, target verdicts, plots and BENCHMARKS.md.

A run is what a measuring script writes as JSON (`bench_prefill.py`: `prefill_TAG.json`, its token-reduction mode:
`token_reduction_TAG.json`): its settings, machine, clock summary and rows of measured values (median seconds, FLOPs
from `visor_hf.flops.count_flops`, KV-cache bytes). Every number compared across rows is derived here, from those
values, in one place (`with_ratios`, `with_reduction_ratios`):

- prefill rows: FLOPs ratio = dense LLM FLOPs / the row's; speed-up = dense LLM prefill time / the row's;
  speed-up / FLOPs ratio (1.0: the FLOPs saving fully became time); TTFT = vision + LLM prefill. "dense" is the
  dense row of the same N_v.
- mixed-batch rows (`mixed_batch_TAG.json`, `bench_prefill.py --mixed-budgets`): FLOPs ratio and speed-up against
  the dense row of the same N_v and group (the batch; one sample alone; the sum of the samples run alone);
  throughput = samples / prefill seconds, prompt tokens (N_v + N_t per sample) / prefill seconds, and samples /
  decode seconds a step (generated tokens/s).
- token-reduction rows: FLOPs ratio = dense LLM FLOPs / (the row's LLM + selection FLOPs); speed-ups of
  selection + prefill and of TTFT (vision + selection + prefill) against the dense row of the same image.

The targets (`check_targets`; `mixed_targets`: the mixed batch's speed-up >= 0.8 x its FLOPs ratio): speed-up >= 0.8 x FLOPs ratio for budgets >= 2 at N_v >= 1,485;
budget 0 >= 20x dense at N_v = 2,916 and <= 1.5x its physical limit; decode per token <= dense; KV bytes <= the
(|S| + |C|) / L share of dense's visual part plus the text part.

Usage:
    python benchmarks/report.py benchmarks/results/prefill_cpu.json                # rewrite its .md and plots
    python benchmarks/report.py RUN.json --benchmarks-md BENCHMARKS.md            # and its BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

MiB = 2**20
PNG_DPI = 120


# --------------------------------------------------------------------------------------------------
# Derived numbers
# --------------------------------------------------------------------------------------------------


def with_ratios(rows: list[dict]) -> list[dict]:
    """Prefill rows with flops_ratio, speedup, efficiency and ttft_s, each against the dense row of its N_v."""
    dense = {row["num_visual"]: row for row in rows if row["model"] == "dense"}
    derived = []
    for row in rows:
        reference = dense[row["num_visual"]]
        flops_ratio = reference["flops_llm"] / row["flops_llm"]
        speedup = reference["prefill_s"] / row["prefill_s"]
        limit = row["model"] == "physical limit"  # no vision encoder, no decode: not a model of its own
        derived.append({**row, "flops_ratio": flops_ratio, "speedup": speedup, "efficiency": speedup / flops_ratio,
                        "ttft_s": float("nan") if limit else row["vision_s"] + row["prefill_s"]})
    return derived


def with_reduction_ratios(rows: list[dict]) -> list[dict]:
    """Token-reduction rows with ttft_s, flops_ratio, llm_speedup and ttft_speedup against the dense row of the image."""
    ttft = lambda row: row["vision_s"] + row["select_s"] + row["prefill_s"]
    dense = {row["image_size"]: row for row in rows if row["model"] == "dense"}
    derived = []
    for row in rows:
        reference = dense[row["image_size"]]
        derived.append({
            **row, "ttft_s": ttft(row),
            "flops_ratio": reference["flops_llm"] / (row["flops_llm"] + row["flops_selection"]),
            "llm_speedup": reference["prefill_s"] / (row["prefill_s"] + row["select_s"]),
            "ttft_speedup": ttft(reference) / ttft(row),
        })
    return derived


# --------------------------------------------------------------------------------------------------
# Tables and targets
# --------------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return "—" if seconds != seconds else f"{seconds * 1000:,.1f}"


def layers_text(row: dict) -> str:
    layers = row.get("self_attn_layers")
    if row["model"] == "dense":
        return "all"
    return "—" if layers is None else (",".join(map(str, layers)) or "∅")


def prefill_table(rows: list[dict]) -> str:
    """One markdown row per measured row (dense, each budget, physical limit at each N_v)."""
    header = ("| N_v | model | S | LLM GFLOPs | FLOPs ratio | vision ms | LLM prefill ms | speed-up | speed-up / FLOPs ratio "
              "| TTFT ms | decode ms/token | KV MiB (bound) | peak mem MiB |")
    lines = [header, "|" + "|".join([" --- "] * (header.count("|") - 1)) + "|"]
    for row in with_ratios(rows):
        kv = "—" if "kv_bytes" not in row else f"{row['kv_bytes'] / MiB:,.1f} ({row['kv_bound'] / MiB:,.1f})"
        mem = "—" if "peak_memory" not in row else f"{row['peak_memory'] / MiB:,.0f}"
        decode = "—" if row["model"] == "physical limit" else ms(row["decode_s"])
        lines.append(
            f"| {row['num_visual']} | {row['model']} | {layers_text(row)} | {row['flops_llm'] / 1e9:,.1f} "
            f"| {row['flops_ratio']:.1f}x | {ms(row['vision_s'])} | {ms(row['prefill_s'])} | {row['speedup']:.1f}x "
            f"| {row['efficiency']:.2f} | {ms(row['ttft_s'])} | {decode} | {kv} | {mem} |"
        )
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def check_targets(rows: list[dict], num_layers: int, num_cross: int) -> list[str]:
    """The targets, one line each: met or MISSED, with the numbers (see the module docstring)."""
    lines = []
    by_size: dict[int, list[dict]] = {}
    for row in with_ratios(rows):
        by_size.setdefault(row["num_visual"], []).append(row)
    for num_visual, group in sorted(by_size.items()):
        dense = next(r for r in group if r["model"] == "dense")
        limit = next(r for r in group if r["model"] == "physical limit")
        for row in group:
            if row is not dense and row is not limit:
                lines += budget_targets(row, dense, limit, num_layers, num_cross)
    return lines


def budget_targets(row: dict, dense: dict, limit: dict, num_layers: int, num_cross: int) -> list[str]:
    """The target lines of one VISOR row."""
    lines, budget, num_visual = [], row["budget"], row["num_visual"]
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
        num_text, k = row["num_text"], len(row["self_attn_layers"] or [])
        numerator = (k + num_cross) * num_visual + num_layers * num_text  # exact integer comparison
        bound = dense["kv_bytes"] * numerator / (num_layers * (num_visual + num_text))
        ok = row["kv_bytes"] * num_layers * (num_visual + num_text) <= dense["kv_bytes"] * numerator
        lines.append(f"- N_v={num_visual} budget {budget}: KV {row['kv_bytes'] / MiB:,.2f} MiB vs bound "
                     f"{bound / MiB:,.2f} MiB ((|S|+|C|)/L of dense's visual part + text part): {verdict(ok)}")
    return lines


def with_mixed_ratios(rows: list[dict]) -> list[dict]:
    """Mixed-batch rows with flops_ratio, speedup, efficiency against the dense row of their N_v and group, and
    throughput (samples_per_s, prompt_tokens_per_s, decode_tokens_per_s)."""
    dense = {(r["num_visual"], r["group"]): r for r in rows if r["model"] == "dense"}
    derived = []
    for row in rows:
        reference = dense[row["num_visual"], row["group"]]
        flops_ratio, speedup = reference["flops_llm"] / row["flops_llm"], reference["prefill_s"] / row["prefill_s"]
        derived.append({
            **row, "flops_ratio": flops_ratio, "speedup": speedup, "efficiency": speedup / flops_ratio,
            "samples_per_s": row["samples"] / row["prefill_s"],
            "prompt_tokens_per_s": row["samples"] * (row["num_visual"] + row["num_text"]) / row["prefill_s"],
            "decode_tokens_per_s": row["samples"] / row["decode_s"],
        })
    return derived


def budgets_text(row: dict) -> str:
    return "all dense" if row["budgets"] is None else " ".join(map(str, row["budgets"]))


def mixed_table(rows: list[dict]) -> str:
    """One markdown row per row: the batch, each sample alone, and the sums of the samples run alone."""
    header = ("| N_v | group | model | samples | budgets | LLM GFLOPs | FLOPs ratio | prefill ms | speed-up "
              "| speed-up / FLOPs ratio | samples/s | prompt tokens/s | decode ms/step | decode tokens/s | KV MiB (bound) |")
    lines = [header, "|" + "|".join([" --- "] * (header.count("|") - 1)) + "|"]
    for r in with_mixed_ratios(rows):
        kv = f"{r['kv_bytes'] / MiB:,.1f} ({r['kv_bound'] / MiB:,.1f})"
        lines.append(
            f"| {r['num_visual']} | {r['group']} | {r['model']} | {r['samples']} | {budgets_text(r)} "
            f"| {r['flops_llm'] / 1e9:,.1f} | {r['flops_ratio']:.1f}x | {ms(r['prefill_s'])} | {r['speedup']:.1f}x "
            f"| {r['efficiency']:.2f} | {r['samples_per_s']:,.2f} | {r['prompt_tokens_per_s']:,.0f} "
            f"| {ms(r['decode_s'])} | {r['decode_tokens_per_s']:,.1f} | {kv} |"
        )
    return "\n".join(lines)


def mixed_targets(rows: list[dict]) -> list[str]:
    """The batch's speed-up against 0.8 x its FLOPs ratio; batching against the sum of singles, for each model."""
    lines = []
    rows = with_mixed_ratios(rows)
    for num_visual in sorted({r["num_visual"] for r in rows}):
        group = {(r["group"], r["model"]): r for r in rows if r["num_visual"] == num_visual}
        mixed = group["batch", "VISOR mixed"]
        lines.append(f"- N_v={num_visual} batch [{budgets_text(mixed)}]: speed-up {mixed['speedup']:.2f}x vs FLOPs ratio "
                     f"{mixed['flops_ratio']:.2f}x ({mixed['efficiency']:.2f} of it; target >= 0.8): "
                     f"{verdict(mixed['efficiency'] >= 0.8)}")
        for model in ("VISOR mixed", "dense"):
            batch, alone = group["batch", model], group["sum of singles", model]
            lines.append(f"- N_v={num_visual} {model}: the batch prefills {batch['samples_per_s']:.2f} samples/s against "
                         f"{alone['samples_per_s']:.2f} for its samples one at a time "
                         f"({alone['prefill_s'] / batch['prefill_s']:.2f}x); decodes {batch['decode_tokens_per_s']:.1f} "
                         f"tokens/s against {alone['decode_tokens_per_s']:.1f} ({alone['decode_s'] / batch['decode_s']:.2f}x)")
    return lines


def token_reduction_table(rows: list[dict]) -> str:
    header = ("| image | N_v | model | N_v kept | LLM GFLOPs | selection GFLOPs | FLOPs ratio | vision ms | selection ms "
              "| LLM prefill ms | TTFT ms | (selection + prefill) speed-up | TTFT speed-up |")
    lines = [header, "|" + "|".join([" --- "] * (header.count("|") - 1)) + "|"]
    for r in with_reduction_ratios(rows):
        lines.append(
            f"| {r['image_size']} | {r['num_visual']} | {r['model']} | {r['kept']} | {r['flops_llm'] / 1e9:,.1f} "
            f"| {r['flops_selection'] / 1e9:,.2f} | {r['flops_ratio']:.1f}x | {ms(r['vision_s'])} | {ms(r['select_s'])} "
            f"| {ms(r['prefill_s'])} | {ms(r['ttft_s'])} | {r['llm_speedup']:.1f}x | {r['ttft_speedup']:.1f}x |"
        )
    return "\n".join(lines)


def background_note(clock: dict) -> str:
    """How much CPU other processes (or the hypervisor) took during the kept timings, on a shared machine."""
    load = sorted(clock.get("background", []))
    if clock.get("cuda") or not load:
        return ""
    return (f"Background load during the kept timings (CPU cores taken by other processes or stolen): median "
            f"{statistics.median(load):.2f}, max {load[-1]:.2f}; {clock['reruns']} timings were re-run because it "
            f"exceeded {clock['max_background']} cores; {clock['waited_s']:.0f} s spent waiting for a quiet CPU "
            "before timings.\n")


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=PNG_DPI)
    pyplot().close(fig)
    return path


def plot_prefill(rows: list[dict], output_dir: Path, tag: str) -> list[Path]:
    """speedup_vs_flops_TAG.png (measured speed-up against the FLOPs ratio) and latency_TAG.png (stacked seconds)."""
    rows = with_ratios(rows)
    return [plot_speedup_vs_flops(rows, output_dir / f"speedup_vs_flops_{tag}.png", tag),
            plot_latency(rows, output_dir / f"latency_{tag}.png", tag)]


def plot_speedup_vs_flops(rows: list[dict], path: Path, tag: str) -> Path:
    fig, ax = pyplot().subplots(figsize=(6, 5))
    visor = [r for r in rows if r["model"].startswith("VISOR")]
    for num_visual in sorted({r["num_visual"] for r in rows}):
        group = [r for r in visor if r["num_visual"] == num_visual]
        ax.plot([r["flops_ratio"] for r in group], [r["speedup"] for r in group], "o-", label=f"N_v = {num_visual}")
        for r in group:
            ax.annotate(str(r["budget"]), (r["flops_ratio"], r["speedup"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ratios = [r["flops_ratio"] for r in visor]
    line = [min(ratios + [1]), max(ratios + [1])]
    ax.plot(line, line, "k--", lw=1, label="speed-up = FLOPs ratio")
    ax.plot(line, [0.8 * x for x in line], "k:", lw=1, label="0.8 x FLOPs ratio")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("LLM FLOPs ratio (dense / VISOR)"), ax.set_ylabel("measured LLM prefill speed-up")
    ax.set_title(f"VISOR budgets vs dense LLaVA-OV ({tag})"), ax.legend(fontsize=8), ax.grid(True, which="both", alpha=0.3)
    return save(fig, path)


def plot_latency(rows: list[dict], path: Path, tag: str) -> Path:
    sizes = sorted({r["num_visual"] for r in rows})
    fig, axes = pyplot().subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4.5), squeeze=False)
    for ax, num_visual in zip(axes[0], sizes):
        group = [r for r in rows if r["num_visual"] == num_visual and r["model"] != "physical limit"]
        names = [r["model"].replace("VISOR ", "b=") for r in group]
        vision = [r["vision_s"] for r in group]
        prefill_s = [r["prefill_s"] for r in group]
        decode_total = [r["decode_s"] * r.get("new_tokens", 0) for r in group]
        ax.bar(names, vision, label="vision encoder")
        ax.bar(names, prefill_s, bottom=vision, label="LLM prefill")
        ax.bar(names, decode_total, bottom=[a + b for a, b in zip(vision, prefill_s)],
               label=f"decode ({group[0].get('new_tokens', 0)} tokens)")
        ax.set_title(f"N_v = {num_visual}"), ax.set_ylabel("seconds")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Latency: dense LLaVA-OV vs VISOR budgets ({tag})")
    return save(fig, path)


def plot_token_reduction(rows: list[dict], output_dir: Path, tag: str) -> Path:
    """token_reduction_TAG.png: selection + prefill time against LLM + selection FLOPs, one panel per image size."""
    rows = with_reduction_ratios(rows)
    sizes = sorted({r["image_size"] for r in rows}, key=lambda s: [int(x) for x in s.split("x")])
    fig, axes = pyplot().subplots(1, len(sizes), figsize=(6 * len(sizes), 5), squeeze=False)
    style = {"dense": ("tab:gray", "s"), "visor": ("tab:blue", "o")}
    for ax, size in zip(axes[0], sizes):
        group = [r for r in rows if r["image_size"] == size]
        for r in group:
            colour, marker = style[r["kind"]]
            colour = "tab:orange" if r["matched_to"] else colour
            gflops, milliseconds = (r["flops_llm"] + r["flops_selection"]) / 1e9, (r["select_s"] + r["prefill_s"]) * 1000
            ax.scatter(gflops, milliseconds, c=colour, marker=marker)
            ax.annotate(r["model"].split(" (")[0], (gflops, milliseconds), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
        ax.set_xscale("log"), ax.set_yscale("log"), ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("LLM + selection GFLOPs"), ax.set_ylabel("selection + LLM prefill ms")
        ax.set_title(f"{size} ({group[0]['num_visual']} visual tokens)")
    fig.suptitle(f"Token reduction: VISOR (blue), dense + pruning (grey), dense matched to a VISOR row (orange), {tag}")
    return save(fig, output_dir / f"token_reduction_{tag}.png")


# --------------------------------------------------------------------------------------------------
# Sections and BENCHMARKS.md
# --------------------------------------------------------------------------------------------------


def images(paths: list[Path]) -> list[str]:
    return [f"![{p.stem}]({p.as_posix()})" for p in paths]


def prefill_section(run: dict, plots: list[Path]) -> str:
    s = run["settings"]
    return "\n".join([
        f"Command: `{run['command']}`",
        "",
        f"Machine: {run['machine']}. Code: {run['code']}. Shapes: {run['shapes']}; N_t = {s['text_tokens']} text tokens; "
        f"batch {s['batch_size']}; median of {s['repeats']} runs after {s['warmup']} warm-up; decode over "
        f"{s['new_tokens']} new tokens.",
        "",
        *([background_note(run["clock"])] if background_note(run["clock"]) else []),
        prefill_table(run["rows"]),
        "",
        "Targets:",
        "",
        *check_targets(run["rows"], run["num_layers"], run["num_cross"]),
        "",
        *images(plots),
    ])


def mixed_section(run: dict) -> str:
    s = run["settings"]
    return "\n".join([
        f"Command: `{run['command']}`",
        "",
        f"Machine: {run['machine']}. Code: {run['code']}. Shapes: {run['shapes']}; N_t = {s['text_tokens']} text tokens; "
        f"the same prompt for every sample; median of {s['repeats']} runs after {s['warmup']} warm-up (each run: "
        f"every row once, round-robin); decode over {s['new_tokens']} new tokens from the prefill's dynamic cache. "
        "Vision features are precomputed (not timed). Groups: *batch* = the samples as one batch; *single* = one "
        "sample alone; *sum of singles* = the samples one after the other (sums of the single rows' medians). FLOPs "
        "ratio and speed-up are against dense in the same group; what each column measures: "
        "`benchmarks/mixed_batch_rows.py`.",
        "",
        *([background_note(run["clock"])] if background_note(run["clock"]) else []),
        mixed_table(run["rows"]),
        "",
        "Targets and throughput:",
        "",
        *mixed_targets(run["rows"]),
    ])


def token_reduction_section(run: dict, figure: Path) -> str:
    s = run["settings"]
    return "\n".join([
        f"Command: `{run['command']}`",
        "",
        f"Machine: {run['machine']}. Code: {run['code']}. Shapes: {run['shapes']}; N_t = {s['text_tokens']}; batch 1; "
        f"median of {s['repeats']} runs after {s['warmup']} warm-up. Weights are random: the packing layer is at its "
        "initialisation (the mean of each group), selections follow random scores; timings and FLOPs do not depend "
        "on the values. What each column measures: `benchmarks/token_reduction_rows.py`.",
        "",
        *([background_note(run["clock"])] if background_note(run["clock"]) else []),
        token_reduction_table(run["rows"]),
        "",
        *images([figure]),
    ])


def update_markdown(path: Path, key: str, title: str, text: str) -> None:
    """Replace (or append) the section `key`, between its markers; the rest of the file is left as is."""
    begin, end = f"<!-- bench_prefill:{key}:begin -->", f"<!-- bench_prefill:{key}:end -->"
    block = f"{begin}\n## {title}\n\n{text}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(current)


def write(run: dict, output_dir, benchmarks_md=None) -> str:
    """A run's section (markdown file and plots in `output_dir`), spliced into `benchmarks_md` if given."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if run["kind"] == "prefill":
        text = prefill_section(run, plot_prefill(run["rows"], output_dir, run["tag"]))
    elif run["kind"] == "token_reduction":
        text = token_reduction_section(run, plot_token_reduction(run["rows"], output_dir, run["tag"]))
    elif run["kind"] == "mixed_batch":
        text = mixed_section(run)  # a table, no plot
    else:
        raise ValueError(f"run kind {run['kind']!r}: expected 'prefill', 'token_reduction' or 'mixed_batch'")
    (output_dir / f"{run['kind']}_{run['tag']}.md").write_text(text + "\n")
    if benchmarks_md:
        update_markdown(Path(benchmarks_md), run["section"], run["title"], text)
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="JSON files written by bench_prefill.py (prefill_TAG.json, ...)")
    parser.add_argument("--output-dir", default=None, help="where the .md and .png go (default: next to each JSON)")
    parser.add_argument("--benchmarks-md", default=None, help="also splice each run's section into this file")
    args = parser.parse_args(argv)
    for path in map(Path, args.runs):
        run = json.loads(path.read_text())
        if "kind" not in run:
            parser.error(f"{path}: not a run of the current scripts (no 'kind'); re-run the benchmark that wrote it")
        write(run, args.output_dir or path.parent, args.benchmarks_md)
        print(f"wrote {run['kind']}_{run['tag']}.md" + (f" and its section of {args.benchmarks_md}" if args.benchmarks_md else ""))


if __name__ == "__main__":
    main()
