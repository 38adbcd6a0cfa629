"""Trainer subclasses and parameter freezing for VISOR's training stages (paper, sections 4.2.3 and 4.3).

- `set_trainable(model, stage)`: which parameters a stage trains.
    stage1:    the new parts only: the model's `new_parameters()` but the router (cross-attention layers with
               their gates and CPE, the VISOR-TR packing layer if any), and the routing-token embedding row
    universal: the language model, projector and new parts; the vision tower only with `train_vision_tower`
    router:    the router MLP only
- `VisorTrainer`: draws one configuration per optimisation step (universal fine-tuning). The draw is a
  function of (seed, global step) only, so every rank of a DDP/FSDP/DeepSpeed run draws the same one
  without communicating, and all micro-batches of a gradient-accumulation step share it.
- `RouterTrainer`: cross-entropy of the router's scores at each routing token against its pseudo-label.

Everything else (optimiser, schedules, logging, checkpoints, resuming, multi-GPU) is transformers' Trainer.
"""

from __future__ import annotations

import random

import torch
from transformers import Trainer

STAGES = ("stage1", "universal", "router")


def stage_parameters(model, stage: str, train_vision_tower: bool = False) -> set[int]:
    """The ids of the parameters `stage` trains. What is new comes from the model (`new_parameters()`), the router
    and vision tower from their modules: no name patterns."""
    router = {id(p) for p in model.model.router.parameters()}
    if stage == "router":
        return router
    if stage == "stage1":
        return {id(p) for p in model.new_parameters().values()} - router
    vision = set() if train_vision_tower else {id(p) for p in model.model.vision_tower.parameters()}
    return {id(p) for p in model.parameters()} - router - vision


def set_trainable(model, stage: str, train_vision_tower: bool = False) -> list[str]:
    """Freeze/unfreeze parameters for `stage`; returns the names of the trainable ones."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; allowed: {STAGES}")
    routing_id = model.config.routing_token_id
    trained = stage_parameters(model, stage, train_vision_tower)
    for param in model.parameters():
        param.requires_grad_(id(param) in trained)
    if stage == "stage1" and routing_id is not None:
        embeddings = model.get_input_embeddings().weight
        embeddings.requires_grad_(True)
        row = torch.zeros(embeddings.shape[0], 1, dtype=embeddings.dtype, device=embeddings.device)
        row[routing_id] = 1
        # Only the routing token's row learns; the pre-trained rows get zero gradient (and no weight decay,
        # see VisorTrainer.get_decay_parameter_names), so Adam leaves them bit-identical.
        embeddings.register_hook(lambda grad: grad * row.to(grad.dtype))
    return [name for name, param in model.named_parameters() if param.requires_grad]


class VisorTrainer(Trainer):
    """Trainer that runs each optimisation step at one configuration drawn from `budget_choices`."""

    def __init__(self, *args, budget_choices=None, stage: str = "universal", **kwargs):
        super().__init__(*args, **kwargs)
        self.budget_choices = budget_choices if budget_choices is not None else ["full"]
        self.stage = stage
        self.budget_draws: list = []

    def current_budget(self):
        rng = random.Random(self.args.seed * 1_000_003 + self.state.global_step)
        return rng.choice(self.budget_choices)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("question_index", None)
        budget = self.current_budget()
        if not self.budget_draws or self.budget_draws[-1][0] != self.state.global_step:
            self.budget_draws.append((self.state.global_step, budget))
        outputs = model(**inputs, budget=budget, num_items_in_batch=num_items_in_batch)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        if self.stage == "stage1":  # the embedding matrix trains one row; decay would move the others
            names = [n for n in names if "embed_tokens" not in n and "lm_head" not in n]
        return names


class RouterTrainer(Trainer):
    """Trains the router: cross-entropy at every routing token against `router_labels` (B, questions)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        targets = inputs.pop("router_labels")  # (B, Q) configuration indices, -100 = padding
        for name in ("labels", "question_index"):
            inputs.pop(name, None)
        outputs = model(**inputs, budget="auto", route_only=True, use_cache=False)
        logits, mask = outputs.router_logits, outputs.routing_mask  # (B, Nt, C), (B, Nt)
        counts = mask.sum(1)
        expected = (targets != -100).sum(1)
        if not torch.equal(counts.cpu(), expected.cpu()):
            raise ValueError(f"routing tokens per sample {counts.tolist()} differ from labels {expected.tolist()}")
        flat_targets = targets[targets != -100]  # question order = routing-token order
        loss = torch.nn.functional.cross_entropy(logits[mask].float(), flat_targets.to(logits.device))
        return (loss, outputs) if return_outputs else loss
