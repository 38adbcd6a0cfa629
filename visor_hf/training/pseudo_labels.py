"""The pseudo-label rule of VISOR's router (paper, section 4.3), as a pure function.

For each question the universal model is run with every configuration, logging whether the answer is
correct and its token-level loss. The label is the cheapest configuration that keeps the full model's
accuracy: among configurations whose accuracy is at least `min_relative_accuracy` (99 %) of the full
configuration's, the one with the fewest self-attention layers, then the lowest loss, then the first
listed in `config.configurations`.

How accuracy is aggregated (our choice; the paper does not say):
- per question (default): accuracy is 0 or 1. If the full configuration answers correctly, only
  configurations that also do qualify; if it fails, every configuration qualifies and the cheapest wins.
- per group (`group_by`): accuracy and loss are averaged over the questions of a group (e.g. a dataset or
  question type) and every question of the group gets the group's label.

A record with several questions gets one label per question (the router sees one routing token per
question); at inference the most expensive prediction wins, so `sample_label` reports that maximum.
"""

from __future__ import annotations

from collections import defaultdict


def choose_configuration(accuracy: dict, loss: dict, configurations: list, min_relative_accuracy: float = 0.99):
    """accuracy/loss: configuration (tuple) -> value. Returns the label configuration."""
    full = max(configurations, key=len)
    threshold = min_relative_accuracy * accuracy[full]
    qualifying = [c for c in configurations if accuracy[c] >= threshold]
    order = {c: i for i, c in enumerate(configurations)}
    return min(qualifying, key=lambda c: (len(c), loss[c], order[c]))


def pseudo_labels(rows: list[dict], configurations: list, min_relative_accuracy: float = 0.99, group_by: str | None = None):
    """rows: one dict per question with "correct" and "loss" dicts keyed by configuration (tuple), and the
    `group_by` field when given. Returns one label (tuple) per row, in order."""
    configurations = [tuple(c) for c in configurations]
    if group_by is None:
        return [
            choose_configuration(
                {c: float(r["correct"][c]) for c in configurations}, r["loss"], configurations, min_relative_accuracy
            )
            for r in rows
        ]
    groups = defaultdict(list)
    for i, row in enumerate(rows):
        if group_by not in row:
            raise ValueError(f"group_by={group_by!r}: question {i} (id {row.get('id')!r}) has no such field")
        groups[row[group_by]].append(row)
    labels = {}
    for name, members in groups.items():
        accuracy = {c: sum(float(r["correct"][c]) for r in members) / len(members) for c in configurations}
        loss = {c: sum(r["loss"][c] for r in members) / len(members) for c in configurations}
        labels[name] = choose_configuration(accuracy, loss, configurations, min_relative_accuracy)
    return [labels[row[group_by]] for row in rows]


def configuration_index(label, configurations: list) -> int:
    """The index in `configurations` of a label given as a list of self-attention layers, in any order
    (`[4, 1]` is `(1, 4)`). Raises ValueError naming the allowed configurations."""
    try:
        key = tuple(sorted(int(layer) for layer in label))
    except (TypeError, ValueError):
        key = None
    for i, configuration in enumerate(configurations):
        if key is not None and tuple(sorted(configuration)) == key:
            return i
    allowed = ", ".join(str(list(c)) for c in configurations)
    raise ValueError(
        f"label {label!r} is not one of the model's configurations; allowed (layers in any order): {allowed}"
    )


def sample_label(question_labels: list, configurations: list):
    """The configuration a record with several questions runs at inference: the most expensive one."""
    index = max(configuration_index(label, configurations) for label in question_labels)
    return tuple(configurations[index])
