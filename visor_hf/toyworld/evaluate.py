"""Accuracy and FLOPs of the dense baseline and of a VISOR model at each budget, per question kind.

A question is answered correctly when the model's greedy prediction at every answer token (the one-word
answer and `<|im_end|>`) equals the reference, with the reference prefix fed in (teacher forcing). Every
answer of the toy world is one token, so this is exactly greedy decoding's exact match, in one forward pass.

FLOPs are `visor_hf.flops.describe_cost`'s: the language model's prefill of each question as it runs alone,
for the configuration the model actually ran (for `budget="auto"`, the router's pick, router MLP included),
divided by dense LLaVA-OneVision's on the same tokens (without token reduction). The vision encoder is the
same for both and left out, and so is a token reduction's selection (`token_selection` in `visor_hf.flops`).

Usage:
    rows = evaluate(model, processor, load_split("toy/data", "test"), "toy/data", budget="auto")
    summary = summarise(rows)        # {"all": {...}, "coarse": {...}, "fine": {...}, "<family>": {...}}
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from ..baselines import TokenReducedLlavaOnevision
from ..configuration_visor import validate_token_reduction
from ..flops import count_flops, describe_cost
from ..training.data import VisorDataCollator


@torch.no_grad()
def evaluate(model, processor, records, image_folder: str, budget=None, batch_size: int = 32, token_reduction=None) -> list[dict]:
    """One row per record (one question each): id, kind, family, answer, predicted, correct, and for a
    VISOR model the configuration run and its LLM prefill FLOPs relative to dense.

    `model` may also be a `baselines.TokenReducedLlavaOnevision` (dense + pruning): its logits cover the shortened
    prompt, so it runs one question at a time, and its FLOPs are counted on the surviving tokens."""
    reduced_dense = isinstance(model, TokenReducedLlavaOnevision)
    config = model.llava.config if reduced_dense else model.config
    is_visor = hasattr(config, "self_attn_layers")
    if reduced_dense:
        if token_reduction is not None and validate_token_reduction(token_reduction) != model.setting:
            raise ValueError(f"token_reduction={token_reduction!r} differs from the wrapper's {model.setting!r}; pass None")
        batch_size, token_reduction = 1, model.setting
    elif not is_visor and token_reduction is not None:
        raise ValueError("token_reduction on a dense model: wrap it in visor_hf.baselines.TokenReducedLlavaOnevision")
    collator = VisorDataCollator(processor, image_folder)
    tokenizer = processor.tokenizer
    (model.llava if reduced_dense else model).eval()
    rows = []
    for start in range(0, len(records), batch_size):
        chunk = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        inputs = collator(chunk)
        labels = inputs.pop("labels")
        question_index = inputs.pop("question_index")
        if int(question_index.max()) > 0:
            raise ValueError("evaluate() takes records with one question each")
        cost = None
        if is_visor:
            out = model(**inputs, budget=budget, use_cache=False, token_reduction=token_reduction)
            cost = describe_cost(model, inputs, budget=budget, self_attn_layers=out.self_attn_layers,
                                 token_reduction=token_reduction)
        else:
            out = model(**inputs, use_cache=False)
            if reduced_dense:  # one prompt, shortened at the image: its text tail lines up with the labels' tail
                labels = labels[:, labels.shape[1] - out.logits.shape[1]:]
                cost = describe_cost(config, inputs, budget="full", token_reduction=token_reduction)
        predicted, target = out.logits[:, :-1].argmax(-1), labels[:, 1:]
        for b, record in enumerate(chunk):
            answer_positions = (target[b] != -100).nonzero().flatten()
            row = {
                "id": record["id"], "kind": record["kind"], "family": record["family"],
                "answer": record["conversations"][-1]["value"],
                "predicted": tokenizer.decode(predicted[b, answer_positions[:1]]).strip(),
                "correct": bool((predicted[b, answer_positions] == target[b, answer_positions]).all()),
            }
            if cost is not None:
                sample = cost.samples[b]
                row["self_attn_layers"] = list(out.self_attn_layers[b]) if is_visor else list(range(config.text_config.num_hidden_layers))
                row["visor_llm_flops"] = (sample.visor if is_visor else sample.dense)["llm"]
                row["num_vision_tokens"], row["num_text_tokens"] = sample.num_vision_tokens, sample.num_text_tokens
                row["num_vision_tokens_kept"] = sample.num_vision_tokens_kept or sample.num_vision_tokens
                # relative to dense LLaVA-OneVision on the whole prompt (no reduction)
                row["dense_llm_flops"] = count_flops(config, sample.num_vision_tokens, sample.num_text_tokens, "full",
                                                     num_crops=sample.num_crops)["dense"]["llm"]
            rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per group ("all", "coarse", "fine" and each family): accuracy, number of questions, LLM FLOPs relative
    to dense (ratio of the summed FLOPs; 1.0 for the dense model) and how often each configuration ran."""
    groups = defaultdict(list)
    for row in rows:
        for name in ("all", row["kind"], row["family"]):
            groups[name].append(row)
    summary = {}
    for name, members in groups.items():
        entry = {"questions": len(members), "accuracy": sum(r["correct"] for r in members) / len(members)}
        if "visor_llm_flops" in members[0]:
            entry["relative_flops"] = sum(r["visor_llm_flops"] for r in members) / sum(r["dense_llm_flops"] for r in members)
            counts = Counter(tuple(r["self_attn_layers"]) for r in members)
            entry["configurations"] = {str(c): counts[c] / len(members) for c in sorted(counts, key=lambda c: (len(c), c))}
            entry["mean_self_attn_layers"] = sum(len(r["self_attn_layers"]) for r in members) / len(members)
        else:
            entry["relative_flops"] = 1.0
        if "num_vision_tokens_kept" in members[0]:
            entry["visual_tokens_kept"] = sum(r["num_vision_tokens_kept"] for r in members) / sum(r["num_vision_tokens"] for r in members)
        summary[name] = entry
    return summary
