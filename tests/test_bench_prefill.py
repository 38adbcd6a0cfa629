"""benchmarks/: what the rows hold and what the report makes of them (no timing checks).

- A row's FLOPs are `visor_hf.flops.count_flops` of the row's shape, and the KV-cache bytes measured after prefill
  equal the analytical `kv_cache_bytes` (for a batch of two: both prompts ran).
- The report (`benchmarks/report.py`) writes one table row per measured row, with ratios computed from the row
  values; its target verdicts flip when the numbers cross the target; it can be redone from the JSON alone.
- A smoke run, typed as the README has it, writes nothing into benchmarks/results.
- A --compile run compiles (Dynamo's counters), is tagged "compiled" beside the eager run, and gives its FLOPs and
  greedy tokens.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from visor_hf import VisorConfig
from visor_hf.flops import count_flops, kv_cache_bytes, token_reduction_counts

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import common  # noqa: E402
import report  # noqa: E402

SMOKE_TEXT_TOKENS = 16  # what --smoke sets
SMOKE_SIZES, SMOKE_BUDGETS, BATCH = (32, 48), (0, 2, 8), 2


def smoke_config() -> VisorConfig:
    """The config of the models a smoke run builds (VISOR's default placement on the smoke LLaVA-OV)."""
    args = argparse.Namespace(smoke=True, attn="sdpa", language_model=common.DEFAULT_LANGUAGE_MODEL, tiny_vision=False)
    return VisorConfig.from_llava_onevision_config(common.llava_config(args))


def results_snapshot() -> dict:
    return {str(p.relative_to(BENCHMARKS)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in (BENCHMARKS / "results").rglob("*")}


def run_script(args: list[str], tmp_path: Path) -> str:
    """Run a benchmark script as a user would (TMPDIR inside the test's folder); returns its stdout."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


OTHER = "# Benchmarks\n\n## Conversion\n\nAnother engineer's section.\n"
STALE = "<!-- bench_prefill:smoke-cpu:begin -->\nstale numbers\n<!-- bench_prefill:smoke-cpu:end -->\n"
AFTER = "\n## Later section\n\nKept as is.\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run without --output-dir (as the README types it), a batch of two, two N_v, three budgets."""
    tmp_path = tmp_path_factory.mktemp("smoke")
    benchmarks_md = tmp_path / "BENCHMARKS.md"
    benchmarks_md.write_text(OTHER + "\n" + STALE + AFTER)
    before = results_snapshot()
    stdout = run_script([str(BENCHMARKS / "bench_prefill.py"), "--smoke", "--batch-size", str(BATCH),
                         "--vision-tokens", *map(str, SMOKE_SIZES), "--budgets", *map(str, SMOKE_BUDGETS),
                         "--benchmarks-md", str(benchmarks_md)], tmp_path)
    folder = Path(re.search(r"rows, table and plots in (\S+)", stdout).group(1))
    run = json.loads((folder / "prefill_smoke-cpu.json").read_text())
    return {"tmp_path": tmp_path, "folder": folder, "run": run, "before": before, "after": results_snapshot(),
            "benchmarks_md": benchmarks_md}


def test_smoke_writes_into_a_temporary_folder_and_leaves_results_untouched(smoke):
    assert smoke["after"] == smoke["before"]
    assert smoke["folder"].is_relative_to(smoke["tmp_path"])  # a fresh temporary folder, not benchmarks/results
    for name in ["speedup_vs_flops_smoke-cpu.png", "latency_smoke-cpu.png"]:
        assert (smoke["folder"] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_hold_the_flops_and_kv_bytes_of_their_shape(smoke):
    config = smoke_config()
    rows = smoke["run"]["rows"]
    assert sorted({(r["num_visual"], r["model"]) for r in rows}) == sorted(
        (n, m) for n in SMOKE_SIZES for m in ["dense", *(f"VISOR {b}" for b in SMOKE_BUDGETS), "physical limit"])
    for row in rows:
        if row["model"] == "physical limit":
            continue
        kind, budget = ("dense", "full") if row["model"] == "dense" else ("visor", row["budget"])
        assert row["num_text"] == SMOKE_TEXT_TOKENS
        flops = count_flops(config, row["num_visual"], SMOKE_TEXT_TOKENS, budget)
        assert row["flops_llm"] == BATCH * flops[kind]["llm"], row["model"]
        bound = kv_cache_bytes(config, row["num_visual"], SMOKE_TEXT_TOKENS, budget, dtype="float32")[kind]["total"]
        assert row["kv_bytes"] == BATCH * bound, row["model"]  # measured after prefill, both prompts of the batch
        if kind == "visor":
            assert tuple(row["self_attn_layers"]) == config.resolve_budget(budget)


def table_rows(markdown: str) -> dict:
    """{(N_v, model): cells} of the prefill table in a report."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if re.match(r"\| \d", line)]
    return {(int(c[0]), c[1]): c for c in cells}


def test_report_table_has_a_row_per_measured_row_with_ratios_from_the_row_values(smoke):
    rows = smoke["run"]["rows"]
    table = table_rows((smoke["folder"] / "prefill_smoke-cpu.md").read_text())
    assert set(table) == {(r["num_visual"], r["model"]) for r in rows}
    for row in rows:
        dense = next(r for r in rows if r["model"] == "dense" and r["num_visual"] == row["num_visual"])
        cells = table[row["num_visual"], row["model"]]
        assert cells[4] == f"{dense['flops_llm'] / row['flops_llm']:.1f}x"  # FLOPs ratio: dense / this row
        assert cells[7] == f"{dense['prefill_s'] / row['prefill_s']:.1f}x"  # speed-up: dense time / this row's
    # its BENCHMARKS.md section replaces the stale one and leaves the others alone
    text = smoke["benchmarks_md"].read_text()
    assert text.startswith(OTHER) and text.endswith(AFTER) and "stale numbers" not in text
    assert text.count("<!-- bench_prefill:smoke-cpu:begin -->") == 1
    assert set(table_rows(text)) == set(table)


def test_report_is_redone_from_the_json_alone(smoke, tmp_path):
    report.main([str(smoke["folder"] / "prefill_smoke-cpu.json"), "--output-dir", str(tmp_path)])
    redone = (tmp_path / "prefill_smoke-cpu.md").read_text().replace(str(tmp_path), "FOLDER")
    assert redone == (smoke["folder"] / "prefill_smoke-cpu.md").read_text().replace(str(smoke["folder"]), "FOLDER")


def synthetic_rows(visor_prefill_s=0.5, visor_decode_s=0.1, visor_kv=None, limit_prefill_s=0.4) -> list[dict]:
    """N_v = 2916, N_t = 64, 24 layers, 8 cross-attention layers: dense, budget 0, budget 2, physical limit."""
    num_visual, num_text, layers, cross = 2916, 64, 24, 8
    per_token = 1000  # KV bytes of one token in one layer
    dense_kv = per_token * layers * (num_visual + num_text)
    zero_kv = per_token * ((0 + cross) * num_visual + layers * num_text)  # exactly the bound of budget 0
    base = {"num_visual": num_visual, "num_text": num_text, "vision_s": 1.0, "decode_s": 0.1}
    return [
        {**base, "model": "dense", "budget": None, "self_attn_layers": list(range(layers)), "flops_llm": 3000e9,
         "prefill_s": 10.0, "kv_bytes": dense_kv, "kv_bound": dense_kv},
        {**base, "model": "VISOR 0", "budget": 0, "self_attn_layers": [], "flops_llm": 60e9,
         "prefill_s": visor_prefill_s, "decode_s": visor_decode_s, "kv_bytes": zero_kv if visor_kv is None else visor_kv,
         "kv_bound": zero_kv},
        {**base, "model": "VISOR 2", "budget": 2, "self_attn_layers": [7, 19], "flops_llm": 300e9, "prefill_s": 1.25},
        {**base, "model": "physical limit", "budget": None, "flops_llm": 55e9, "prefill_s": limit_prefill_s,
         "vision_s": float("nan"), "decode_s": float("nan")},
    ]


def verdict_of(lines: list[str], fragment: str) -> str:
    (line,) = [line for line in lines if fragment in line]
    return line.rsplit(": ", 1)[1]


@pytest.mark.parametrize("fragment, met, missed", [
    ("faster than dense", dict(visor_prefill_s=0.49), dict(visor_prefill_s=0.51)),  # >= 20x faster than dense
    ("budget 0: prefill", dict(limit_prefill_s=0.34), dict(limit_prefill_s=0.33)),  # <= 1.5x the physical limit
    ("budget 0: decode", dict(visor_decode_s=0.1), dict(visor_decode_s=0.1001)),  # <= dense's time per token
    ("budget 0: KV", dict(), dict(visor_kv=1000 * (8 * 2916 + 24 * 64) + 1)),  # <= (|S|+|C|)/L visual + text
])
def test_target_verdicts_flip_when_the_numbers_cross_the_target(fragment, met, missed):
    assert verdict_of(report.check_targets(synthetic_rows(**met), 24, 8), fragment) == "met"
    assert verdict_of(report.check_targets(synthetic_rows(**missed), 24, 8), fragment) == "MISSED"


def test_efficiency_target_reads_speedup_against_flops_ratio():
    """Budget 2: FLOPs ratio 10x, so the speed-up must reach 8x (0.8 of it)."""
    rows = synthetic_rows()
    lines = report.check_targets(rows, 24, 8)
    assert verdict_of(lines, "budget 2: speed-up") == "met"  # 10 s / 1.25 s = 8.0x
    rows[2]["prefill_s"] = 1.26
    assert verdict_of(report.check_targets(rows, 24, 8), "budget 2: speed-up") == "MISSED"


def test_token_reduction_rows_match_flops_and_time_the_selection(tmp_path):
    before = results_snapshot()
    run_script([str(BENCHMARKS / "bench_prefill.py"), "--smoke", "--output-dir", str(tmp_path), "--token-reduction",
                "visionzip", "vispruner", "pack", "--keep-ratio", "0.5", "--image-sizes", "112x112"], tmp_path)
    assert results_snapshot() == before
    config, image_size = smoke_config(), (112, 112)
    rows = {row["model"]: row for row in json.loads((tmp_path / "token_reduction_smoke-cpu.json").read_text())["rows"]}
    for model in ["dense", "dense + visionzip @ 0.5", "dense + vispruner @ 0.5", "VISOR 2", "VISOR 2 + visionzip @ 0.5",
                  "VISOR 2 + vispruner @ 0.5", "VISOR 2 + pack x2"]:
        assert model in rows
    dense = rows["dense"]
    for name, row in rows.items():
        reduced = row["setting"] is not None
        counted = count_flops(config, row["num_visual"], row["num_text"], row["budget"] or "full",
                              token_reduction=row["setting"], image_size=image_size)
        assert row["flops_llm"] == counted[row["kind"]]["llm"], name
        assert row["kept"] == token_reduction_counts(config, image_size, row["setting"])["kept"], name
        assert (row["kept"] < dense["kept"]) == reduced, name
        assert (row["select_s"] > 0) == reduced and (row["flops_selection"] > 0) == reduced, name
        if row["matched_to"]:  # dense + pruning at the ratio that costs what the VISOR row costs
            target = rows[row["matched_to"]]["flops_llm"]
            if "(=" in name:
                assert abs(row["flops_llm"] - target) <= 0.02 * target, name
            else:
                assert row["flops_llm"] > target and row["kept"] <= 0.1 * dense["kept"] + 10, name
    assert sum("(=" in name for name in rows) >= 1
    assert (tmp_path / "token_reduction_smoke-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


MIXED = (0, 0, 2, 8)


def test_mixed_budget_batch_rows_count_each_samples_flops_and_cache(tmp_path):
    """--mixed-budgets: the batch's FLOPs are count_flops summed over its samples (dense: B x its own), its cache holds
    what each sample alone holds, the sum-of-singles rows add up the single rows, and the report's ratios come from
    the row values."""
    run_script([str(BENCHMARKS / "bench_prefill.py"), "--smoke", "--output-dir", str(tmp_path), "--vision-tokens", "32",
                "--mixed-budgets", *map(str, MIXED)], tmp_path)
    run = json.loads((tmp_path / "mixed_batch_smoke-cpu.json").read_text())
    rows = {(r["group"], r["model"]): r for r in run["rows"]}
    assert set(rows) == {("batch", "dense"), ("batch", "VISOR mixed"), ("single", "dense"), ("single", "VISOR 0"),
                         ("single", "VISOR 2"), ("single", "VISOR 8"), ("sum of singles", "dense"),
                         ("sum of singles", "VISOR mixed")}
    config, num_text = smoke_config(), SMOKE_TEXT_TOKENS
    flops = {b: count_flops(config, 32, num_text, b)["visor"]["llm"] for b in set(MIXED)}
    dense_flops = count_flops(config, 32, num_text, "full")["dense"]["llm"]
    kv = lambda b: kv_cache_bytes(config, 32, num_text, b, dtype="float32")["dense" if b == "full" else "visor"]["total"]
    mixed, dense = rows["batch", "VISOR mixed"], rows["batch", "dense"]
    assert mixed["flops_llm"] == sum(flops[b] for b in MIXED) and mixed["budgets"] == list(MIXED)
    assert dense["flops_llm"] == len(MIXED) * dense_flops and mixed["flops_llm"] < dense["flops_llm"] / 2
    assert mixed["kv_bytes"] == sum(kv(b) for b in MIXED) == sum(rows["single", f"VISOR {b}"]["kv_bytes"] for b in MIXED)
    assert dense["kv_bytes"] == len(MIXED) * kv("full")
    for model, parts in [("VISOR mixed", [f"VISOR {b}" for b in MIXED]), ("dense", ["dense"] * len(MIXED))]:
        total = rows["sum of singles", model]
        for key in ("prefill_s", "decode_s", "flops_llm", "kv_bytes"):
            assert total[key] == pytest.approx(sum(rows["single", p][key] for p in parts)), (model, key)
    table = (tmp_path / "mixed_batch_smoke-cpu.md").read_text()
    (line,) = [line for line in table.splitlines() if line.startswith("| 32 | batch | VISOR mixed |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[6] == f"{dense['flops_llm'] / mixed['flops_llm']:.1f}x"
    assert cells[8] == f"{dense['prefill_s'] / mixed['prefill_s']:.1f}x"
    assert cells[10] == f"{len(MIXED) / mixed['prefill_s']:,.2f}"  # samples/s
    assert "batch [0 0 2 8]: speed-up" in table


@pytest.mark.slow
def test_compiled_run_is_tagged_compiled_compiles_and_matches_the_eager_run(tmp_path):
    """--compile, with Dynamo's 'eager' backend (the compiled path without Inductor's code generation: about a
    minute): its rows, files and BENCHMARKS.md section are tagged compiled and sit next to the eager run's; every
    model compiled graphs at the first N_v (torch._dynamo's counters, as the script records them), VISOR and the
    physical limit none at a second N_v (sizes stay symbolic), no model any in its warm-up and timed runs; and each
    row has the eager row's FLOPs, layers and greedy token."""
    benchmarks_md = tmp_path / "BENCHMARKS.md"
    command = [str(BENCHMARKS / "bench_prefill.py"), "--smoke", "--output-dir", str(tmp_path), "--vision-tokens", "32",
               "48", "--budgets", "2", "--benchmarks-md", str(benchmarks_md)]
    run_script(command, tmp_path)
    stdout = run_script(command + ["--compile", "--compile-backend", "eager"], tmp_path)
    eager = json.loads((tmp_path / "prefill_smoke-cpu.json").read_text())
    compiled = json.loads((tmp_path / "prefill_smoke-cpu-compiled-eager.json").read_text())
    assert "compiled" in compiled["title"] and "compiled" not in eager["title"]
    text = benchmarks_md.read_text()  # two sections: the compiled run did not overwrite the eager one
    for section in ("smoke-cpu", "smoke-cpu-compiled-eager"):
        assert text.count(f"<!-- bench_prefill:{section}:begin -->") == 1, section
    assert "graphs compiled" in stdout
    rows = {(row["num_visual"], row["model"]): row for row in compiled["rows"]}
    assert set(rows) == {(row["num_visual"], row["model"]) for row in eager["rows"]}
    for row in eager["rows"]:
        twin, first_size = rows[row["num_visual"], row["model"]], row["num_visual"] == 32
        for key in ("flops_llm", "self_attn_layers", "next_token", "kv_bytes"):
            assert twin.get(key) == row.get(key), (row["model"], row["num_visual"], key)
        assert twin["graphs_recompiled"] == 0, row["model"]
        if first_size:
            assert twin["graphs_compiled"] > 0, row["model"]
        elif row["model"] != "dense":  # dense recompiles transformers' placeholder check, specialised on N_v
            assert twin["graphs_compiled"] == 0, row["model"]


def test_count_ops_shows_an_unpadded_decode_step_builds_no_masks():
    """benchmarks/count_ops.py counts operators per step; without padding VISOR's decode step calls none of the
    mask-building operators (`causal_allowed`'s comparison, `attend`'s empty-row check) at any budget."""
    import count_ops

    rows = count_ops.main(["--smoke", "--budgets", "0", "8", "--vision-tokens", "40"])
    assert [row["model"] for row in rows] == ["dense", "VISOR 0", "VISOR 8"]
    for row in rows[1:]:
        assert row["decode_ops"]["aten::le"] == 0, row["decode_top"]
        assert row["decode_ops"]["aten::any"] == 1, row["decode_top"]  # the check for image tokens, not attention
        assert row["decode"] > rows[0]["decode"]  # the cross-attention layers are extra operators


def test_profile_prefill_help_lists_the_shape_flags(capsys):
    import profile_prefill

    with pytest.raises(SystemExit):
        profile_prefill.main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ["--tiny-vision", "--smoke", "--language-model", "--budget", "--vision-tokens"]:
        assert flag in help_text


def test_dense_model_is_given_its_cache_under_the_name_its_forward_takes():
    """The benchmarks pass the cache as `common.CACHE_KW`; dense LLaVA-OV's forward must take that name, or it would
    swallow the cache into **kwargs and decode every step without its past (as on transformers 5.17, which still says
    `past_key_values`, while the name was chosen by the major version)."""
    import inspect

    from transformers import LlavaOnevisionForConditionalGeneration

    assert common.CACHE_KW in inspect.signature(LlavaOnevisionForConditionalGeneration.forward).parameters
