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
