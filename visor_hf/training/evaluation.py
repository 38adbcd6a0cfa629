"""Run a VISOR model at many configurations over a data set: per question loss and correctness.

Used by the configuration search and by pseudo-labelling. Correctness is teacher-forced exact match:
a question is answered correctly when the argmax prediction equals every answer token (through
`<|im_end|>`). It needs one forward pass per configuration and batch, with no generation, and agrees with
greedy decoding whenever greedy decoding reproduces the reference answer. The loss is the mean token
cross-entropy of the answer.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate_configurations(model, dataset, collator, configurations, batch_size: int = 4, group_by: str | None = None):
    """One row per question: {"id", "question", "correct": {configuration: bool}, "loss": {configuration: float}}.

    `configurations` may be any subsets of `config.self_attn_layers`: they are set as the model's
    configurations for the duration of the call.
    """
    configurations = [tuple(sorted(c)) for c in configurations]
    saved = model.config.configurations
    model.config.configurations = [list(c) for c in configurations]
    model.eval()
    device = next(model.parameters()).device
    rows = []
    try:
        progress = tqdm(range(0, len(dataset), batch_size), desc=f"{len(configurations)} configurations", unit="batch")
        for start in progress:
            records = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(records).items()}
            labels, question_index = batch.pop("labels"), batch.pop("question_index")
            target, question = labels[:, 1:], question_index[:, 1:]
            batch_rows = [
                {"id": r.get("id", start + b), "question": q, **({group_by: r.get(group_by)} if group_by else {}),
                 "correct": {}, "loss": {}}
                for b, r in enumerate(records)
                for q in range(int(question[b].max()) + 1)
            ]
            for configuration in configurations:
                logits = model(**batch, budget=[configuration] * len(records), use_cache=False).logits[:, :-1]
                token_loss = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none")
                hit = logits.argmax(-1) == target
                k = 0
                for b in range(len(records)):
                    for q in range(int(question[b].max()) + 1):
                        tokens = question[b] == q
                        batch_rows[k]["loss"][configuration] = float(token_loss[b][tokens].mean())
                        batch_rows[k]["correct"][configuration] = bool(hit[b][tokens].all())
                        k += 1
            rows.extend(batch_rows)
    finally:
        model.config.configurations = saved
    return rows


def summarise(rows, configurations) -> dict:
    """configuration -> (accuracy, mean loss) over all questions."""
    summary = {}
    for c in map(tuple, configurations):
        summary[c] = (
            sum(r["correct"][c] for r in rows) / max(1, len(rows)),
            sum(r["loss"][c] for r in rows) / max(1, len(rows)),
        )
    return summary


def select_viable(summary: dict, full: tuple) -> list[tuple]:
    """The viable configurations: for each number of layers the best subset (accuracy, then loss), minus
    those a cheaper kept configuration beats or equals on both accuracy and loss. `full` is always kept."""
    best = defaultdict(lambda: None)
    for c, (accuracy, loss) in summary.items():
        current = best[len(c)]
        if current is None or (-accuracy, loss) < (-summary[current][0], summary[current][1]):
            best[len(c)] = c
    kept = []
    for size in sorted(best):
        c = best[size]
        accuracy, loss = summary[c]
        dominated = any(summary[k][0] >= accuracy and summary[k][1] <= loss for k in kept)
        if c == full or not dominated:
            kept.append(c)
    if full not in kept:
        kept.append(full)
    return kept
