"""VISOR as an lmms-eval model: `python -m lmms_eval --model visor --model_args pretrained=DIR,budget=auto ...`.

lmms-eval (0.7.3) finds this model through the `lmms_eval.models` entry point in setup.py, which names
`manifest()` below. The class is a "simple" lmms-eval model: it answers `generate_until` requests (the
output type of open-ended VQA tasks); `loglikelihood` and multi-round generation raise NotImplementedError.

Model arguments (`--model_args key=value,...`; they win over lmms-eval's `--batch_size` / `--device` flags,
which lmms-eval always passes, 1 and None by default):

    pretrained       a VISOR folder or Hub id (loaded with `VisorForConditionalGeneration.from_pretrained`)
    budget           auto (the router picks per sample) | full | k (the configuration with k self-attention
                     layers); default: the config's `default_budget`. A task's `generation_kwargs` (or
                     `--gen_kwargs budget=...`) may set `budget` per task; it wins over this one.
    token_reduction  none | visionzip:R | vispruner:R (R = keep ratio in (0, 1]) | pack:K (pack factor K) | a JSON
                     setting with more fields, e.g. '{"method":"visionzip","keep_ratio":0.5,"score_layer":-1}';
                     default: the config's own `token_reduction`
    batch_size       prompts per `generate` call (default 1); a batch may mix budgets and configurations
    device           cpu | cuda | cuda:N (default: cuda when available)
    dtype            float32 | bfloat16 | float16 (default: as saved)
    max_new_tokens   used when the task sets none (default 32)
    cost_log         a JSONL file that gets one line per sample (see below)

Design choices:

- Prompts are the processor's chat template with one image entry per visual the task gives, placed before the
  task's text (lmms-eval's `<image>` placeholders in the text are used instead when their count matches), so
  an answer here is the answer `model.generate` gives for that chat prompt.
- Requests are batched in their own order, `batch_size` at a time, among requests with the same generation
  settings (apart from `budget`); prompts are left-padded, and each sample of a batch runs its own budget
  (VISOR's generate takes one budget per sample, and a batch gives each sample what it gets alone).
- One process: rank 0 of world size 1 (lmms-eval's default); `accelerate launch` data parallelism is not wired.
- Every sample is logged (lmms-eval's loguru logger at INFO, the `cost_log` file, and `self.sample_costs`):
  the self-attention layers it ran (for "auto" the router's pick, from `model.route`), and the language
  model's prefill FLOPs from `visor_hf.flops.describe_cost` against dense LLaVA-OneVision on the same prompt
  without token reduction, stated as "N x fewer than dense". The vision encoder, the same for both, is left out.

Usage (with `pip install -e ".[eval]"` and `pip install --no-deps lmms-eval==0.7.3`, see the README):

    python -m lmms_eval --model visor --model_args pretrained=DIR,budget=auto,batch_size=8 \\
        --tasks my_task --include_path my_tasks/ --output_path out/ --log_samples
"""

from __future__ import annotations

import json

import torch
from loguru import logger
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from tqdm import tqdm

from .configuration_visor import TOKEN_REDUCTION_METHODS, validate_token_reduction
from .flops import describe_cost, resolve_configuration
from .modeling_visor import VisorForConditionalGeneration
from .processing_visor import VisorProcessor

MODEL_ID = "visor"
# generation settings lmms-eval tasks use that `generate` takes as they are; `until` and `budget` are ours
GENERATE_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample",
                 "repetition_penalty")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def manifest():
    """What the `lmms_eval.models` entry point hands lmms-eval: `--model visor` is this module's `Visor`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.Visor")


def parse_budget(value):
    """A budget from a command line (`auto`, `full`, `k`; lmms-eval turns digits into ints) as `generate` takes it."""
    if value is None or value in ("auto", "full"):
        return value
    if isinstance(value, bool) or not str(value).isdigit():
        raise ValueError(f"budget={value!r}: use auto, full or a number k of self-attention layers")
    return int(value)


def parse_token_reduction(value):
    """`none`, `visionzip:0.25`, `vispruner:0.5`, `pack:4` or a JSON setting (`{"method": "visionzip", "keep_ratio":
    0.25, "score_layer": -1}`) as the model takes it: "none", a setting dict, or None (not given: the config's own
    setting applies)."""
    if value is None or value == "none":
        return value
    if isinstance(value, dict) or str(value).lstrip().startswith("{"):
        setting = value if isinstance(value, dict) else json.loads(value)
        validate_token_reduction(setting)
        return setting
    method, _, amount = str(value).partition(":")
    if method not in TOKEN_REDUCTION_METHODS or not amount:
        raise ValueError(f"token_reduction={value!r}: use none, or METHOD:AMOUNT with METHOD in {TOKEN_REDUCTION_METHODS} "
                         "(visionzip:0.25 keeps a quarter of the visual tokens; pack:4 packs 4 tokens into one)")
    key = "pack_factor" if method == "pack" else "keep_ratio"
    try:
        setting = {"method": method, key: int(amount) if method == "pack" else float(amount)}
    except ValueError:
        raise ValueError(f"token_reduction={value!r}: {key} {amount!r} is not a number") from None
    validate_token_reduction(setting)
    return setting


def build_messages(context: str, num_images: int, image_token: str) -> list[dict]:
    """One user turn: the task's `<image>` placeholders where it put them (when there is one per image), otherwise
    every image first and then the text."""
    content = []
    if num_images and context.count(image_token) == num_images:
        pieces = context.split(image_token)
        for i, piece in enumerate(pieces):
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
            if i < num_images:
                content.append({"type": "image"})
    else:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": context.replace(image_token, "").strip()}]
    return [{"role": "user", "content": content}]


def truncate_at(text: str, until: list[str]) -> str:
    """The text up to the first of the stop strings."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class Visor(lmms):
    """VISOR behind lmms-eval's `lmms` interface (see the module docstring for the arguments)."""

    def __init__(self, pretrained: str, budget=None, token_reduction=None, batch_size=1, device=None, dtype=None,
                 max_new_tokens: int = 32, cost_log: str | None = None, max_batch_size=None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args {sorted(unknown)} for --model {MODEL_ID}; allowed: pretrained, budget, "
                             "token_reduction, batch_size, device, dtype, max_new_tokens, cost_log")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a number >= 1 ('auto' is not supported)")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: allowed {sorted(DTYPES)}")
        self.batch_size = int(batch_size)
        self.token_reduction = parse_token_reduction(token_reduction)
        self.max_new_tokens = int(max_new_tokens)
        self.cost_log = cost_log
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        load_kwargs = {} if dtype is None else {"dtype": DTYPES[dtype]}
        self.model = VisorForConditionalGeneration.from_pretrained(pretrained, **load_kwargs).to(self._device).eval()
        self.processor = VisorProcessor.from_pretrained(pretrained)
        # not given: the config's default, resolved here so that "auto" is routed (and its router counted) by name
        self.budget = parse_budget(self.model.config.default_budget if budget is None else budget)
        self.sample_costs: list[dict] = []

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """As lmms-eval's, except that a key given in `--model_args` wins over the CLI's own (`--batch_size`, whose
        default 1 is always passed, and `--device`) instead of clashing with it; a dict is taken as it is."""
        args = dict(arg_string) if isinstance(arg_string, dict) else simple_parse_args_string(arg_string or "")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # ---------------------------------------------------------------------------------------------- requests

    def loglikelihood(self, requests):
        raise NotImplementedError(f"--model {MODEL_ID} answers generate_until tasks only (open-ended generation); "
                                  "loglikelihood (multiple-choice scoring) is not implemented")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"--model {MODEL_ID} answers generate_until tasks only; multi-round generation "
                                  "is not implemented")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One answer per request, in the requests' order."""
        answers = [None] * len(requests)
        batches = self.batches(requests)
        for indices in tqdm(batches, disable=self.rank != 0, desc="VISOR answering"):
            for i, answer in zip(indices, self.answer_batch([requests[i] for i in indices])):
                answers[i] = answer
        self.log_summary()
        return answers

    def batches(self, requests: list[Instance]) -> list[list[int]]:
        """Indices of the requests, `batch_size` at a time, among requests of the same generation settings
        (apart from `budget`, which may differ within a batch)."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            settings = {k: v for k, v in request.args[1].items() if k != "budget"}
            groups.setdefault(json.dumps(settings, sort_keys=True, default=str), []).append(i)
        return [group[start : start + self.batch_size] for group in groups.values()
                for start in range(0, len(group), self.batch_size)]

    # ---------------------------------------------------------------------------------------------- one batch

    @torch.inference_mode()
    def answer_batch(self, requests: list[Instance]) -> list[str]:
        """Generate for a batch of requests with the same generation settings; log each sample's cost."""
        inputs = self.model_inputs(requests)
        settings = dict(requests[0].args[1])
        budgets = [self.budget_of(request) for request in requests]
        budget = budgets[0] if len(set(map(str, budgets))) == 1 else budgets
        layers = self.configurations(inputs, budgets)
        tokens = self.model.generate(
            **inputs, budget=budget, token_reduction=self.token_reduction, pad_token_id=self.processor.tokenizer.pad_token_id,
            **self.generation_kwargs(settings),
        )
        new_tokens = tokens[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        until = settings.get("until") or []
        answers = [truncate_at(text, [until] if isinstance(until, str) else until).strip() for text in texts]
        self.log_costs(requests, inputs, budgets, layers, answers)
        return answers

    def budget_of(self, request: Instance):
        """The request's own budget (from its task's generation settings), else the model's."""
        budget = request.args[1].get("budget")
        return self.budget if budget is None else parse_budget(budget)

    def model_inputs(self, requests: list[Instance]) -> dict:
        """The processor's left-padded batch for the requests' chat prompts and images."""
        prompts, images = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
            if any(isinstance(v, str) for v in visuals):
                raise ValueError(f"--model {MODEL_ID} takes images; task {task!r} gave a path or video ({visuals[0]!r})")
            visuals = [v.convert("RGB") for v in visuals]
            messages = build_messages(context, len(visuals), self.processor.image_token)
            prompts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True))
            images.append(visuals)
        inputs = self.processor(images=images if any(images) else None, text=prompts, padding=True, padding_side="left",
                                return_tensors="pt")
        inputs = inputs.to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return dict(inputs)

    def configurations(self, inputs: dict, budgets: list) -> list[tuple[int, ...]]:
        """The self-attention layers each sample runs: the router's pick where its budget is "auto"."""
        routed = None
        if "auto" in budgets:
            routed = self.model.route(**inputs, token_reduction=self.token_reduction)
        return [tuple(routed[b]) if budget == "auto" else resolve_configuration(self.model.config, budget)
                for b, budget in enumerate(budgets)]

    def generation_kwargs(self, settings: dict) -> dict:
        """`generate`'s keywords for a task's generation settings (greedy unless temperature > 0)."""
        kwargs = {k: settings[k] for k in GENERATE_KEYS if k in settings}
        kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        temperature = float(kwargs.pop("temperature", 0) or 0)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs["do_sample"] = False
            kwargs.pop("top_p", None), kwargs.pop("top_k", None)
        return kwargs

    # ---------------------------------------------------------------------------------------------- logging

    def log_costs(self, requests: list[Instance], inputs: dict, budgets: list, layers: list, answers: list[str]) -> None:
        """Log each sample's self-attention layers and LLM prefill FLOPs against dense LLaVA-OneVision."""
        visor = describe_cost(self.model, inputs, budget=budgets, self_attn_layers=layers,
                              token_reduction=self.token_reduction).samples
        dense = describe_cost(self.model, inputs, budget=budgets, self_attn_layers=layers, token_reduction="none").samples
        for request, budget, sample, plain, answer in zip(requests, budgets, visor, dense, answers):
            _, _, _, doc_id, task, split = request.args
            row = {
                "task": task, "split": split, "doc_id": doc_id, "budget": budget,
                "self_attn_layers": list(sample.self_attn_layers), "num_vision_tokens": sample.num_vision_tokens,
                "num_vision_tokens_kept": sample.num_vision_tokens_kept or sample.num_vision_tokens,
                "num_text_tokens": sample.num_text_tokens, "visor_llm_flops": sample.visor["llm"],
                "dense_llm_flops": plain.dense["llm"], "fewer_than_dense": plain.dense["llm"] / max(1, sample.visor["llm"]),
                "answer": answer,
            }
            self.sample_costs.append(row)
            logger.info(
                f"visor {task}/{doc_id}: budget {budget}, self-attention layers {row['self_attn_layers']} "
                f"(of {list(self.model.config.self_attn_layers)}), LLM prefill {row['visor_llm_flops'] / 1e6:.3f} MFLOPs, "
                f"{row['fewer_than_dense']:.2f}x fewer than dense ({row['dense_llm_flops'] / 1e6:.3f} MFLOPs)"
            )
            if self.cost_log:
                with open(self.cost_log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")

    def log_summary(self) -> None:
        """Mean self-attention layers and total LLM prefill FLOPs against dense over the samples so far."""
        if not self.sample_costs:
            return
        rows = self.sample_costs
        mean_layers = sum(len(r["self_attn_layers"]) for r in rows) / len(rows)
        ratio = sum(r["dense_llm_flops"] for r in rows) / max(1, sum(r["visor_llm_flops"] for r in rows))
        logger.info(f"visor: {len(rows)} samples, {mean_layers:.2f} self-attention layers on average, "
                    f"LLM prefill {ratio:.2f}x fewer FLOPs than dense in total")
