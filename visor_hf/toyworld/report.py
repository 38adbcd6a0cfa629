"""Tables, plot and checkpoint from a finished toy-world run (`pipeline.py`).

`write_report` reads `results.json` of a work directory and writes `results.md`, `results.json` (summaries,
no per-question rows) and `results.png`; with `write_docs` it also replaces the generated block of the
"Toy world" sections of README.md and BENCHMARKS.md (between `<!-- toyworld:... -->` markers) and states,
with the numbers, whether each of the paper's three claims holds here:

    (a) the cross-attention-only budget (0 self-attention layers) is close to dense on coarse questions:
        coarse accuracy at budget 0 >= dense's - 3 points;
    (b) self-attention layers recover fine-grained accuracy: fine accuracy at the full budget >= budget 0's
        + 10 points;
    (c) budget="auto" keeps >= 99 % of the full budget's accuracy with <= 90 % of its FLOPs, and runs more
        self-attention layers on fine questions than on coarse ones.

`save_checkpoint` copies the routed model into the package (`visor_hf/toyworld/checkpoint/`), with the
converter's tokenizer files (written as JSON edits of hand-written files, so that 4.57 and 5.x both load
them) and a short model card.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import statistics

from .world import KIND

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(os.path.dirname(PACKAGE_DIR))
MARKERS = {"README.md": "toyworld:readme", "BENCHMARKS.md": "toyworld:benchmarks"}
COARSE_THRESHOLD, FINE_GAIN, AUTO_ACCURACY, AUTO_FLOPS = 0.03, 0.10, 0.99, 0.90
MEASURES = ("Accuracy is exact match of the one-word answer (greedy); FLOPs are the language model's prefill "
            "(`visor_hf.flops`, the router's MLP included for \"auto\"; the vision encoder, the same for all, is left out).")
SCORING_NOTE = (
    "The pruning scores come from the toy vision tower's one SigLIP layer, which is untrained: LLaVA-OneVision takes "
    "the features before it (`vision_feature_layer=-2`, so that every visual token stays one 8 x 8 patch, the world's "
    "premise), so no gradient reaches it, and its attention is a random initialisation's. Training it would mean using "
    "its output, which mixes the patches of each crop before the language model and hands cross-attention the relations "
    "this world keeps for the self-attention layers; so it is not done here. These rows show pruning whose attention "
    "scores carry nothing learned; the similarity-based parts of both methods (VisionZip's contextual merging, "
    "VisPruner's duplicate removal) compare the tokens themselves and do not depend on them.")


def load_results(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


class Spread(float):
    """A mean over seeds that keeps its spread: the sample standard deviation (`sd`) and the values. Arithmetic on it
    gives plain floats (the claims are judged on means); the tables print it as "mean ± sd"."""

    def __new__(cls, values):
        values = [float(v) for v in values]
        mean = float.__new__(cls, sum(values) / len(values))
        mean.values = values
        mean.sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return mean


def _pct(x: float) -> str:
    if isinstance(x, Spread):
        return f"{100 * x:.1f} ± {100 * x.sd:.1f}"
    return f"{100 * x:.1f}"


def _num(x: float, digits: int = 2) -> str:
    if isinstance(x, Spread):
        return f"{x:.{digits}f} ± {x.sd:.{digits}f}"
    return f"{x:.{digits}f}"


def _fewer(relative_flops: float) -> str:
    """A FLOPs fraction of dense (what evaluate.py records) in the package's one ratio direction: "N x fewer than dense"."""
    if isinstance(relative_flops, Spread):
        fewer = [1 / max(1e-9, v) for v in relative_flops.values]
        return f"{sum(fewer) / len(fewer):.2f}x" + (f" ± {statistics.stdev(fewer):.2f}" if len(fewer) > 1 else "")
    return f"{1 / max(1e-9, relative_flops):.2f}x"


def _layers(name: str) -> str:
    """A configuration's name, str(tuple), as a table entry: "none" or "1,3"."""
    layers = ast.literal_eval(name)
    return ",".join(map(str, layers)) if layers else "none"


def fixed_budgets(results: dict) -> list[str]:
    return [name for name in results["budgets"] if name != "auto"]


def claims(results: dict) -> list[dict]:
    budgets = results["budgets"]
    names = fixed_budgets(results)
    zero, full, auto, dense = budgets[names[0]], budgets[names[-1]], budgets["auto"], results["dense"]
    a_gap = zero["coarse"]["accuracy"] - dense["coarse"]["accuracy"]
    b_gain = full["fine"]["accuracy"] - zero["fine"]["accuracy"]
    ratio = auto["all"]["accuracy"] / max(1e-9, full["all"]["accuracy"])
    flops = auto["all"]["relative_flops"] / full["all"]["relative_flops"]
    layers_fine, layers_coarse = auto["fine"]["mean_self_attn_layers"], auto["coarse"]["mean_self_attn_layers"]
    fine_families = [f for f in groups(results) if KIND.get(f) == "fine"]
    per_family_gain = "; ".join(
        f"{f}: {_pct(zero[f]['accuracy'])} % -> {_pct(full[f]['accuracy'])} % (dense {_pct(dense[f]['accuracy'])} %)"
        for f in fine_families)
    per_family_layers = ", ".join(f"{f} {auto[f]['mean_self_attn_layers']:.2f}" for f in groups(results)[2:] if f in auto)
    return [
        {"claim": "(a) 0 self-attention layers close to dense on coarse questions",
         "holds": a_gap >= -COARSE_THRESHOLD,
         "evidence": f"coarse accuracy {_pct(zero['coarse']['accuracy'])} % at budget 0 vs {_pct(dense['coarse']['accuracy'])} % "
                     f"dense ({100 * a_gap:+.1f} points; criterion: >= -{100 * COARSE_THRESHOLD:.0f}), at "
                     f"{_fewer(zero['coarse']['relative_flops'])} fewer LLM FLOPs than dense on these questions (the table's "
                     "column is over all questions)"},
        {"claim": "(b) self-attention layers recover fine-grained accuracy",
         "holds": b_gain >= FINE_GAIN,
         "evidence": f"fine accuracy {_pct(zero['fine']['accuracy'])} % at budget 0 -> "
                     + " -> ".join(f"{_pct(budgets[n]['fine']['accuracy'])} %" for n in names[1:])
                     + f" (full; {100 * b_gain:+.1f} points, criterion >= +{100 * FINE_GAIN:.0f}); dense "
                     f"{_pct(dense['fine']['accuracy'])} %" + (f". Per fine family, budget 0 -> full: {per_family_gain}"
                                                              if per_family_gain else "")},
        {"claim": "(c) budget=\"auto\": >= 99 % of full accuracy at clearly fewer FLOPs, more layers for fine questions",
         "holds": ratio >= AUTO_ACCURACY and flops <= AUTO_FLOPS and layers_fine > layers_coarse,
         "evidence": f"accuracy {_pct(auto['all']['accuracy'])} % vs {_pct(full['all']['accuracy'])} % full "
                     f"({100 * ratio:.1f} %); LLM FLOPs {_fewer(auto['all']['relative_flops'])} vs {_fewer(full['all']['relative_flops'])} "
                     f"fewer than dense ({100 * flops:.0f} % of full's); self-attention layers per question {layers_fine:.2f} fine vs "
                     f"{layers_coarse:.2f} coarse" + (f" (per family: {per_family_layers})" if per_family_layers else "")},
    ]


def main_table(results: dict) -> str:
    model = results["model"]
    lines = [
        "| model | self-attention layers on visual tokens | coarse acc. % | fine acc. % | all % | LLM prefill FLOPs: x fewer than dense |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    dense = results["dense"]
    lines.append(f"| dense LLaVA-OV (baseline) | all {int(model['num_layers'])} | {_pct(dense['coarse']['accuracy'])} | "
                 f"{_pct(dense['fine']['accuracy'])} | {_pct(dense['all']['accuracy'])} | 1.00x |")
    names = fixed_budgets(results)
    for i, name in enumerate(names):
        s = results["budgets"][name]
        k = len(ast.literal_eval(name))
        label = f"VISOR, budget={k}" + (' ("full")' if i == len(names) - 1 else "")
        lines.append(f"| {label} | {_layers(name)} | {_pct(s['coarse']['accuracy'])} | {_pct(s['fine']['accuracy'])} | "
                     f"{_pct(s['all']['accuracy'])} | {_fewer(s['all']['relative_flops'])} |")
    s = results["budgets"]["auto"]
    lines.append(f"| **VISOR, budget=\"auto\"** | router: {_num(s['all']['mean_self_attn_layers'])} on average | "
                 f"{_pct(s['coarse']['accuracy'])} | {_pct(s['fine']['accuracy'])} | {_pct(s['all']['accuracy'])} | "
                 f"{_fewer(s['all']['relative_flops'])} |")
    return "\n".join(lines)


def groups(results: dict) -> list[str]:
    families = [k for k in results["dense"] if k not in ("all", "coarse", "fine")]
    order = {"coarse": 0, "fine": 1}
    return ["coarse", "fine"] + sorted(families, key=lambda f: (order.get(KIND.get(f), 2), families.index(f)))


def router_table(results: dict) -> str:
    auto = results["budgets"]["auto"]
    configurations = fixed_budgets(results)
    lines = [
        "| questions | " + " | ".join(f"picks {_layers(c)}" for c in configurations)
        + " | mean layers | auto acc. % | full acc. % | auto FLOPs: x fewer than dense |",
        "| --- | " + " | ".join("---:" for _ in configurations) + " | ---: | ---: | ---: | ---: |",
    ]
    full = results["budgets"][configurations[-1]]
    for group in groups(results):
        if group not in auto:
            continue
        s = auto[group]
        shares = " | ".join(f"{_pct(s['configurations'].get(c, 0.0))} %" for c in configurations)
        label = f"**{group}**" if group in ("coarse", "fine") else group
        lines.append(f"| {label} | {shares} | {_num(s['mean_self_attn_layers'])} | {_pct(s['accuracy'])} | "
                     f"{_pct(full[group]['accuracy'])} | {_fewer(s['relative_flops'])} |")
    return "\n".join(lines)


def family_table(results: dict) -> str:
    names = ["dense"] + fixed_budgets(results) + ["auto"]
    header = ["dense"] + [f"budget {_layers(n)}" for n in fixed_budgets(results)] + ["auto"]
    lines = ["| questions (count) | " + " | ".join(header) + " |", "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for group in ["all"] + groups(results):
        stats = [results["dense"] if n == "dense" else results["budgets"][n] for n in names]
        lines.append(f"| {group} ({int(stats[0][group]['questions'])}) | " + " | ".join(_pct(s[group]["accuracy"]) for s in stats) + " |")
    return "\n".join(lines)


def reduction_table(results: dict) -> str:
    """Token reduction (issue 8): pruning on VISOR and on dense, with the accuracy change against the same model
    unpruned, per question kind (the paper: pruning hurts fine-grained questions most)."""
    names = fixed_budgets(results)
    plain = {"dense": results["dense"], "VISOR full": results["budgets"][names[-1]], "VISOR auto": results["budgets"]["auto"]}
    lines = ["| model | keep ratio (visual tokens kept) | coarse acc. % (change) | fine acc. % (change) | all % "
             "| LLM prefill FLOPs: x fewer than dense |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in plain.items():
        lines.append(f"| {name} | 1 (100 %) | {_pct(s['coarse']['accuracy'])} | {_pct(s['fine']['accuracy'])} | "
                     f"{_pct(s['all']['accuracy'])} | {_fewer(s['all']['relative_flops'])} |")
    for entry in results["reduction"]:
        s, base = entry["summary"], plain[entry["base"]]
        change = lambda kind: f"{_pct(s[kind]['accuracy'])} ({100 * (s[kind]['accuracy'] - base[kind]['accuracy']):+.1f})"
        note = {None: "", True: " (matched to VISOR auto's FLOPs)", False: " (closest to VISOR auto's FLOPs)"}[entry["matched"]]
        lines.append(f"| {entry['base']} + {entry['method']}{note} | {entry['keep_ratio']:.3g} "
                     f"({_pct(s['all']['visual_tokens_kept'])} %) | {change('coarse')} | {change('fine')} | "
                     f"{_pct(s['all']['accuracy'])} | {_fewer(s['all']['relative_flops'])} |")
    return "\n".join(lines)


def reduction_block(results: dict) -> list[str]:
    """The token-reduction section of a report ([] when the run has no pruning rows)."""
    if not results.get("reduction"):
        return []
    return ["Token reduction (training-free pruning at the share of visual tokens kept; the paper's claim is that "
            "pruning hurts fine-grained questions most):\n\n" + reduction_table(results) + "\n\n" + SCORING_NOTE]


def claims_block(results: dict) -> str:
    return "\n".join(f"- {c['claim']}: **{'holds' if c['holds'] else 'does not hold'}**. {c['evidence']}."
                     for c in claims(results))


def provenance(results: dict, workdir: str) -> str:
    timings_path = os.path.join(workdir, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    machine = results["machine"]
    model = results["model"]
    stages = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    return (f"Run: preset `{results['preset']}` on {machine['cpu_count']} CPU cores ({machine['processor']}, "
            f"{machine['torch_threads']} torch threads), torch {machine['torch']}, transformers {machine['transformers']}; "
            f"{sum(timings.values()) / 60:.0f} min in all ({stages}). Dense model {model['dense_num_parameters'] / 1e6:.2f} M "
            f"parameters, VISOR {model['num_parameters'] / 1e6:.2f} M; {model['num_layers']} language-model layers, "
            f"cross-attention after {model['cross_attn_layers']}, self-attention layers {model['self_attn_layers']}, "
            f"viable configurations {model['configurations']}. Test set: {results['dense']['all']['questions']} questions, "
            f"one per image.")


def markdown(results: dict, workdir: str, plot_name: str = "results.png") -> str:
    return "\n\n".join([
        main_table(results),
        MEASURES,
        "The paper's claims on this world:\n\n" + claims_block(results),
        "What the router picks (share of test questions per configuration of self-attention layers):\n\n" + router_table(results),
        "Accuracy (%) per question family:\n\n" + family_table(results),
        *reduction_block(results),
        provenance(results, workdir),
    ])


def replace_block(path: str, marker: str, body: str) -> None:
    """Replace the text between `<!-- marker:start -->` and `<!-- marker:end -->` in `path`."""
    text = open(path, encoding="utf-8").read()
    pattern = re.compile(rf"(<!-- {re.escape(marker)}:start -->\n).*?(<!-- {re.escape(marker)}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{path}: no <!-- {marker}:start --> ... <!-- {marker}:end --> block to fill")
    text = pattern.sub(lambda m: m.group(1) + body.strip() + "\n" + m.group(2), text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_report(workdir: str, results_dir: str, write_docs: bool = False) -> str:
    results = load_results(workdir)
    os.makedirs(results_dir, exist_ok=True)
    text = markdown(results, workdir)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    summary = {k: v for k, v in results.items() if k != "rows"}
    with open(os.path.join(results_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(results, os.path.join(results_dir, "results.png"))
    if write_docs:
        relative_plot = os.path.relpath(os.path.join(results_dir, "results.png"), REPO_DIR)
        readme = "\n\n".join([main_table(results), claims_block(results),
                              "Router picks per question type:\n\n" + router_table(results),
                              f"![accuracy vs FLOPs]({relative_plot})", provenance(results, workdir)])
        replace_block(os.path.join(REPO_DIR, "README.md"), MARKERS["README.md"], readme)
        benchmarks = markdown(results, workdir) + f"\n\n![accuracy vs FLOPs]({relative_plot})"
        replace_block(os.path.join(REPO_DIR, "BENCHMARKS.md"), MARKERS["BENCHMARKS.md"], benchmarks)
    print(text)
    return text


# --------------------------------------------------------------------------------------------------
# Several seeds
# --------------------------------------------------------------------------------------------------


def _by_size(results: dict, names: list[str]) -> dict:
    """`results` with its fixed configurations renamed, by number of layers, to `names` (the kept seed's): the
    configuration search may pick other layers on another seed; budget k is compared with budget k."""
    own = fixed_budgets(results)
    sizes = {len(ast.literal_eval(n)): n for n in own}
    rename = {sizes[len(ast.literal_eval(n))]: n for n in names if len(ast.literal_eval(n)) in sizes}

    def renamed(mapping: dict) -> dict:
        return {rename.get(k, k): v for k, v in mapping.items() if k in rename or k not in own}

    out = copy.deepcopy(results)
    out["budgets"] = renamed(out["budgets"])
    for summary in out["budgets"].values():
        for group in summary.values():
            if isinstance(group, dict) and "configurations" in group:
                group["configurations"] = renamed(group["configurations"])
    return out


def merge_seeds(runs: list[dict]) -> dict:
    """Several seeds' results (the first is the kept one) merged leaf by leaf: every number becomes a `Spread`;
    strings, flags and lists of numbers are the first seed's. Configuration shares a seed lacks count as 0."""
    names = fixed_budgets(runs[0])
    runs = [runs[0]] + [_by_size(r, names) for r in runs[1:]]

    def merge(items, fill=None):  # fill: a dict's value where a seed lacks the key (None: keep the keys all have)
        first = items[0]
        if isinstance(first, dict):
            keys = [k for k in first if all(k in i for i in items)] if fill is None else list(dict.fromkeys(k for i in items for k in i))
            return {k: merge([i.get(k, fill) for i in items], 0.0 if k == "configurations" else None) for k in keys}
        if isinstance(first, list) and first and all(isinstance(x, dict) for x in first) and len({len(i) for i in items}) == 1:
            return [merge([i[j] for i in items]) for j in range(len(first))]
        if isinstance(first, bool) or not isinstance(first, (int, float)):
            return first
        return Spread(items)

    merged = merge([{k: v for k, v in r.items() if k != "rows"} for r in runs])
    merged["seeds"] = [r.get("seed", i) for i, r in enumerate(runs)]
    return merged


def family_verdicts(results: dict) -> list[dict]:
    """Per family: (a) on a coarse family (budget 0 within 3 points of dense), (b) on a fine one (full >= budget 0 +
    10 points); (c)'s accuracy part on every family (auto >= 99 % of full's accuracy)."""
    names = fixed_budgets(results)
    zero, full, auto, dense = (results["budgets"][names[0]], results["budgets"][names[-1]], results["budgets"]["auto"],
                               results["dense"])
    rows = []
    for family in groups(results)[2:]:
        if KIND.get(family) == "coarse":
            criterion, holds = "(a) budget 0 >= dense - 3", zero[family]["accuracy"] - dense[family]["accuracy"] >= -COARSE_THRESHOLD
        else:
            criterion, holds = "(b) full >= budget 0 + 10", full[family]["accuracy"] - zero[family]["accuracy"] >= FINE_GAIN
        auto_holds = auto[family]["accuracy"] >= AUTO_ACCURACY * full[family]["accuracy"]
        rows.append({"family": family, "kind": KIND.get(family), "criterion": criterion, "holds": bool(holds),
                     "auto_holds": bool(auto_holds), "dense": dense[family]["accuracy"], "zero": zero[family]["accuracy"],
                     "full": full[family]["accuracy"], "auto": auto[family]["accuracy"],
                     "auto_layers": auto[family].get("mean_self_attn_layers", 0.0)})
    return rows


def _verdict(holds: bool) -> str:
    return "holds" if holds else "does not hold"


def seed_claims_block(merged: dict, runs: list[dict]) -> str:
    """Each claim judged on the seeds' means, with its verdict on every seed."""
    lines = []
    per_seed = [claims(r) for r in runs]
    for i, claim in enumerate(claims(merged)):
        seeds = ", ".join(f"seed {r.get('seed', j)}: {_verdict(c[i]['holds'])}" for j, (r, c) in enumerate(zip(runs, per_seed)))
        lines.append(f"- {claim['claim']}: **{_verdict(claim['holds'])}** on the mean of {len(runs)} seeds ({seeds}). "
                     f"Means: {claim['evidence']}.")
    return "\n".join(lines)


def family_verdict_table(merged: dict, runs: list[dict]) -> str:
    per_seed = [{row["family"]: row for row in family_verdicts(r)} for r in runs]
    lines = ["| family | kind | criterion | dense % | budget 0 % | full % | auto % | auto's layers | verdict (mean) "
             "| verdict per seed | auto >= 99 % of full (mean) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for row in family_verdicts(merged):
        seeds = " / ".join(_verdict(s[row["family"]]["holds"]) for s in per_seed)
        lines.append(f"| {row['family']} | {row['kind']} | {row['criterion']} | {_pct(row['dense'])} | {_pct(row['zero'])} | "
                     f"{_pct(row['full'])} | {_pct(row['auto'])} | {_num(row['auto_layers'])} | **{_verdict(row['holds'])}** | "
                     f"{seeds} | {'yes' if row['auto_holds'] else 'no'} |")
    return "\n".join(lines)


def seed_table(runs: list[dict], kept: int) -> str:
    """One row per seed: accuracy per kind of dense, budget 0, full and auto, and auto's FLOPs; the kept seed marked."""
    lines = ["| seed | dense coarse / fine % | budget 0 coarse / fine % | full coarse / fine % | auto coarse / fine % "
             "| auto FLOPs: x fewer than dense | dense's lowest family |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for results in runs:
        names = fixed_budgets(results)
        pair = lambda s: f"{_pct(s['coarse']['accuracy'])} / {_pct(s['fine']['accuracy'])}"
        worst = min(groups(results)[2:], key=lambda f: results["dense"][f]["accuracy"])
        seed = results.get("seed")
        label = f"**{seed} (kept checkpoint)**" if seed == kept else str(seed)
        lines.append(f"| {label} | {pair(results['dense'])} | {pair(results['budgets'][names[0]])} | "
                     f"{pair(results['budgets'][names[-1]])} | {pair(results['budgets']['auto'])} | "
                     f"{_fewer(results['budgets']['auto']['all']['relative_flops'])} | {worst} "
                     f"{_pct(results['dense'][worst]['accuracy'])} % |")
    return "\n".join(lines)


def fresh_split_table(check: dict) -> str:
    lines = [f"The kept checkpoint on a fresh test split ({check['questions']} questions of a world drawn with seed "
             f"{check['world_seed']}, not seen in training, search or labelling) against its reported accuracy "
             f"(criterion: within {100 * check['tolerance']:.0f} points per kind): **{'within' if check['within'] else 'NOT within'}**.",
             "", "| budget | kind | reported % | fresh split % | difference (points) |", "| --- | --- | ---: | ---: | ---: |"]
    for name, kinds in check["budgets"].items():
        label = name if name == "auto" else _layers(name)
        for kind, entry in kinds.items():
            lines.append(f"| {label} | {kind} | {_pct(entry['reported'])} | {_pct(entry['fresh'])} | "
                         f"{100 * entry['difference']:+.1f} |")
    return "\n".join(lines)


def seeds_provenance(merged: dict, runs: list[dict], seeds_info: dict) -> str:
    """Where the numbers come from. Each seed's own torch threads and stage times are read from its run (seeds
    finished in an earlier sitting may have run with other threads than this sitting's command says)."""
    machine, model = merged["machine"], merged["model"]
    reused = seeds_info.get("reused") or []
    if not reused:
        schedule = (f"{seeds_info['jobs']} at a time with {seeds_info['threads']} torch thread(s) each, "
                    f"{seeds_info['seconds'] / 60:.0f} min in all")
    elif set(reused) == set(merged["seeds"]):
        schedule = f"no seed trained by this command (seeds {reused} ran in an earlier sitting)"
    else:
        schedule = f"{seeds_info['seconds'] / 60:.0f} min in this sitting (seeds {reused} ran in an earlier sitting)"
    timings = {str(seed): t for seed, t in seeds_info["timings"].items()}  # seeds.json's keys are strings

    def seed_times(run: dict) -> str:
        t = timings[str(run["seed"])]
        return (f"seed {run['seed']} ({run['machine']['torch_threads']} torch thread(s), {sum(t.values()) / 60:.0f} min): "
                + ", ".join(f"{k} {v / 60:.1f}" for k, v in t.items()))

    per_seed = "; ".join(seed_times(run) for run in runs)
    return (f"Run: `{seeds_info['command']}`, preset `{merged['preset']}`, seeds {merged['seeds']} (each seed draws its own "
            f"world and trains with its own seed), {schedule}, on {int(machine['cpu_count'])} CPU cores "
            f"({machine['processor']}), torch {machine['torch']}, transformers {machine['transformers']}. Per seed, "
            f"stage times (min): {per_seed}. Dense model {model['dense_num_parameters'] / 1e6:.2f} M parameters, "
            f"VISOR {model['num_parameters'] / 1e6:.2f} M; "
            f"{int(model['num_layers'])} language-model layers, cross-attention after {model['cross_attn_layers']}, "
            f"self-attention layers {model['self_attn_layers']}, the kept seed's viable configurations "
            f"{model['configurations']} (other seeds' searches may pick other layers: budgets are compared by size). "
            f"Test set: {int(merged['dense']['all']['questions'])} questions a seed, one per image. ± is the standard "
            f"deviation over the seeds.")


def seed_markdown(merged: dict, runs: list[dict], seeds_info: dict, check: dict | None) -> str:
    kept = runs[0].get("seed")
    return "\n\n".join([
        main_table(merged),
        f"Mean ± standard deviation over seeds {merged['seeds']}; the kept checkpoint (`visor_hf/toyworld/checkpoint`) is seed "
        f"{kept}'s. " + MEASURES,
        "The paper's claims on this world (criteria fixed before the run):\n\n" + seed_claims_block(merged, runs),
        "Per family:\n\n" + family_verdict_table(merged, runs),
        "Per seed:\n\n" + seed_table(runs, kept),
        f"What the router picks (seed {kept}, the kept checkpoint; share of test questions per configuration):\n\n"
        + router_table(runs[0]),
        "Accuracy (%) per question family:\n\n" + family_table(merged),
        *reduction_block(merged),
        *([fresh_split_table(check)] if check else []),
        seeds_provenance(merged, runs, seeds_info),
    ])


def plot(results: dict, path: str) -> None:
    """Accuracy against FLOPs per question kind: fixed budgets, auto and dense; over seeds the means, with error bars of
    one standard deviation (none for a single run's results)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = fixed_budgets(results)
    sd = lambda x: 100 * getattr(x, "sd", 0.0)
    for group, colour in (("coarse", "tab:blue"), ("fine", "tab:red")):
        stats = [results["budgets"][n][group] for n in names]
        ax.errorbar([s["relative_flops"] for s in stats], [100 * s["accuracy"] for s in stats],
                    yerr=[sd(s["accuracy"]) for s in stats], fmt="o-", color=colour, capsize=3, label=f"{group}: fixed budgets")
        for n, s in zip(names, stats):
            ax.annotate(str(len(ast.literal_eval(n))), (s["relative_flops"], 100 * s["accuracy"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=8, color=colour)
        auto, dense = results["budgets"]["auto"][group], results["dense"][group]
        ax.errorbar([auto["relative_flops"]], [100 * auto["accuracy"]], yerr=[sd(auto["accuracy"])], fmt="*", ms=14,
                    color=colour, capsize=3, label=f"{group}: auto")
        ax.errorbar([1.0], [100 * dense["accuracy"]], yerr=[sd(dense["accuracy"])], fmt="s", ms=8, mfc="none",
                    color=colour, capsize=3, label=f"{group}: dense")
    ax.set_xlabel("language-model prefill FLOPs relative to dense LLaVA-OV")
    ax.set_ylabel("test accuracy (%)")
    seeds = f", {len(results['seeds'])} seeds" if len(results.get("seeds", [])) > 1 else ""
    ax.set_title(f"VISOR on the toy world{seeds} (numbers: self-attention layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plain(value):
    """JSON-ready: a `Spread` as {"mean", "sd", "values"}."""
    if isinstance(value, Spread):
        return {"mean": float(value), "sd": value.sd, "values": value.values}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def write_seed_report(workdir: str, seed_dirs: list[str], results_dir: str, write_docs: bool = False) -> str:
    """The report over seeds (`seed_dirs[0]` is the kept one): results.md/json/png in `results_dir`, and with
    `write_docs` the README's and BENCHMARKS.md's toy-world blocks. Reads `seeds.json` and, if there,
    `fresh_split.json` from `workdir`."""
    runs = [load_results(d) for d in seed_dirs]
    merged = merge_seeds(runs)
    seeds_info = json.load(open(os.path.join(workdir, "seeds.json")))
    fresh_path = os.path.join(workdir, "fresh_split.json")
    check = json.load(open(fresh_path)) if os.path.exists(fresh_path) else None
    os.makedirs(results_dir, exist_ok=True)
    text = seed_markdown(merged, runs, seeds_info, check)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    summary = {"merged": _plain(merged), "per_seed": [{k: v for k, v in r.items() if k != "rows"} for r in runs],
               "claims": {"mean": [dict(c, holds=bool(c["holds"])) for c in claims(merged)],
                          "per_seed": [[dict(c, holds=bool(c["holds"])) for c in claims(r)] for r in runs]},
               "families": _plain(family_verdicts(merged)), "fresh_split": check, "run": seeds_info}
    with open(os.path.join(results_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(merged, os.path.join(results_dir, "results.png"))
    if write_docs:
        relative_plot = os.path.relpath(os.path.join(results_dir, "results.png"), REPO_DIR)
        readme = "\n\n".join([main_table(merged), seed_claims_block(merged, runs),
                                "Per family:\n\n" + family_verdict_table(merged, runs),
                                "Per seed:\n\n" + seed_table(runs, runs[0].get("seed")),
                                f"![accuracy vs FLOPs]({relative_plot})", seeds_provenance(merged, runs, seeds_info)])
        replace_block(os.path.join(REPO_DIR, "README.md"), MARKERS["README.md"], readme)
        replace_block(os.path.join(REPO_DIR, "BENCHMARKS.md"), MARKERS["BENCHMARKS.md"], text + f"\n\n![accuracy vs FLOPs]({relative_plot})")
    print(text)
    return text


# --------------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------------

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "configuration_visor.py",
               "modeling_visor.py", "processing_visor.py", "router_eval.json")
# Processor files come from the converter's output, not from the trained folder: training stages re-save the
# processor with the running transformers, and tokenizer files written by 5.x do not load in 4.57.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                   "processor_config.json", "chat_template.jinja")


def save_checkpoint(workdir: str, destination: str) -> None:
    final, converted = os.path.join(workdir, "final"), os.path.join(workdir, "visor")
    shutil.rmtree(destination, ignore_errors=True)
    os.makedirs(destination)
    for name in MODEL_FILES:
        shutil.copyfile(os.path.join(final, name), os.path.join(destination, name))
    for name in PROCESSOR_FILES:
        if os.path.exists(os.path.join(converted, name)):
            shutil.copyfile(os.path.join(converted, name), os.path.join(destination, name))
    shutil.copyfile(os.path.join(workdir, "searched", "search.json"), os.path.join(destination, "search.json"))
    results = load_results(workdir) if os.path.exists(os.path.join(workdir, "results.json")) else None
    with open(os.path.join(destination, "README.md"), "w") as f:
        f.write(model_card(results))


def model_card(results: dict | None) -> str:
    text = (
        "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags: [visor, toy]\n---\n"
        "# VISOR toy-world checkpoint\n\n"
        "A tiny LLaVA-OneVision (SigLIP + Qwen2, random init) trained on CPU on the synthetic world of "
        "`visor_hf.toyworld`, converted to VISOR and trained through the whole VISOR pipeline (stage 1, universal, "
        "configuration search, pseudo-labels, router). It answers questions about 64 x 64 toy images only.\n\n"
        "    python -m visor_hf.demo                       # uses this folder\n"
        "    python -m visor_hf.toyworld run --workdir toy_run --save-checkpoint --write-docs   # regenerates it\n"
    )
    if results:
        text += "\n## Results on the toy world's test split\n\n" + main_table(results) + "\n"
    return text
