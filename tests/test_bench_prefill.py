"""benchmarks/bench_prefill.py --smoke runs end to end and writes its table, raw results and plots (no timing checks)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_prefill_smoke_writes_table_plots_and_its_own_markdown_section(tmp_path):
    benchmarks_md = tmp_path / "BENCHMARKS.md"
    other = "# Benchmarks\n\n## Conversion\n\nAnother engineer's section.\n"
    stale = "<!-- bench_prefill:smoke-cpu:begin -->\nstale numbers\n<!-- bench_prefill:smoke-cpu:end -->\n"
    after = "\n## Later section\n\nKept as is.\n"
    benchmarks_md.write_text(other + "\n" + stale + after)
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_prefill.py"), "--smoke", "--output-dir", str(tmp_path),
               "--benchmarks-md", str(benchmarks_md)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "budget 'auto' skipped" in done.stdout

    table = (tmp_path / "prefill_smoke-cpu.md").read_text()
    for model in ["dense", "VISOR 0", "VISOR 2", "VISOR 4", "VISOR 8", "physical limit"]:
        assert f"| {model} |" in table
    assert "Targets:" in table
    rows = json.loads((tmp_path / "prefill_smoke-cpu.json").read_text())["rows"]
    assert len(rows) == 2 * 6  # two visual-token counts, six rows each
    assert all(row["prefill_s"] > 0 for row in rows)
    assert all(row["kv_bytes"] == row["kv_bound"] for row in rows if "kv_bytes" in row)  # measured = analytical
    for name in ["speedup_vs_flops_smoke-cpu.png", "latency_smoke-cpu.png"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The script replaces its own section and leaves the others alone.
    text = benchmarks_md.read_text()
    assert text.startswith(other) and text.endswith(after)
    assert "stale numbers" not in text
    assert text.count("<!-- bench_prefill:smoke-cpu:begin -->") == 1
    assert "| VISOR 0 |" in text


def test_bench_prefill_token_reduction_smoke_matches_flops_and_times_the_selection(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_prefill.py"), "--smoke", "--output-dir", str(tmp_path),
               "--token-reduction", "visionzip", "vispruner", "pack", "--keep-ratio", "0.5", "--image-sizes", "112x112"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["model"]: row for row in json.loads((tmp_path / "token_reduction_smoke-cpu.json").read_text())["rows"]}
    for model in ["dense", "dense + visionzip @ 0.5", "dense + vispruner @ 0.5", "VISOR 2", "VISOR 2 + visionzip @ 0.5",
                  "VISOR 2 + vispruner @ 0.5", "VISOR 2 + pack x2"]:
        assert model in rows
    dense = rows["dense"]
    for name, row in rows.items():
        reduced = row["setting"] is not None
        assert (row["kept"] < dense["kept"]) == reduced, name
        assert (row["select_s"] > 0) == reduced and (row["flops_selection"] > 0) == reduced, name
        assert row["prefill_s"] > 0
        if row["matched_to"]:  # dense + pruning at the ratio that costs what the VISOR row costs
            target = rows[row["matched_to"]]["flops_llm"]
            if "(=" in name:
                assert abs(row["flops_llm"] - target) <= 0.02 * target, name
            else:
                assert row["flops_llm"] > target and row["kept"] <= 0.1 * dense["kept"] + 10, name
    assert sum("(=" in name for name in rows) >= 1
    assert (tmp_path / "token_reduction_smoke-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_count_ops_shows_an_unpadded_decode_step_builds_no_masks():
    """benchmarks/count_ops.py counts operators per step; without padding VISOR's decode step calls none of the
    mask-building operators (`causal_allowed`'s comparison, `attend`'s empty-row check) at any budget."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import count_ops

    rows = count_ops.main(["--smoke", "--budgets", "0", "8", "--vision-tokens", "40"])
    assert [row["model"] for row in rows] == ["dense", "VISOR 0", "VISOR 8"]
    for row in rows[1:]:
        assert row["decode_ops"]["aten::le"] == 0, row["decode_top"]
        assert row["decode_ops"]["aten::any"] == 1, row["decode_top"]  # the check for image tokens, not attention
        assert row["decode"] > rows[0]["decode"]  # the cross-attention layers are extra operators


def test_bench_prefill_batch_counts_every_prompt(tmp_path):
    """--batch-size 2: the KV cache measured after prefill is twice one prompt's bound (so both prompts ran), and
    the FLOPs reported are the batch's."""
    script = str(ROOT / "benchmarks" / "bench_prefill.py")

    def rows(batch):
        out = tmp_path / f"b{batch}"
        command = [sys.executable, script, "--smoke", "--vision-tokens", "32", "--budgets", "0", "8",
                   "--batch-size", str(batch), "--output-dir", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        return {row["model"]: row for row in json.loads((out / "prefill_smoke-cpu.json").read_text())["rows"]}

    one, two = rows(1), rows(2)
    for model in ["dense", "VISOR 0", "VISOR 8"]:
        assert two[model]["kv_bytes"] == two[model]["kv_bound"] == 2 * one[model]["kv_bytes"]
        assert two[model]["flops_llm"] == 2 * one[model]["flops_llm"]
