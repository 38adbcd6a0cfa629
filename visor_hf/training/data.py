"""Training data in LLaVA's conversation format, turned into VISOR inputs.

A data file is JSON (a list) or JSONL of records:

    {"id": "0", "image": "relative/path.png",
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}

`image` is optional (text-only records) and relative to `--image_folder`; conversations may have many
turns. The collator renders each record with the processor's chat template (which appends the routing
token after each question), runs the processor, and builds:

- `labels`: the answer tokens of every assistant turn (through its `<|im_end|>`), -100 elsewhere;
- `question_index`: for every label token, which question (0, 1, ...) it answers, -1 elsewhere.

Usage:
    dataset = load_records("train.jsonl")
    collator = VisorDataCollator(processor, image_folder="images/")
    batch = collator([dataset[0], dataset[1]])
"""

from __future__ import annotations

import os

import torch
from PIL import Image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_MARK = "<image>"


def load_records(path: str):
    """A `datasets.Dataset` of the records in a JSON or JSONL file."""
    import datasets

    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    return datasets.load_dataset("json", data_files=path, split="train")


def to_messages(record: dict) -> list[dict]:
    """LLaVA conversation -> chat-template messages; `<image>` becomes an image item in its turn."""
    messages = []
    has_image = bool(record.get("image"))
    image_placed = False
    for turn in record["conversations"]:
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"record {record.get('id')!r}: unknown speaker {turn['from']!r}; allowed: {sorted(ROLES)}")
        text = turn["value"]
        content = []
        if role == "user" and has_image and not image_placed and (IMAGE_MARK in text or not messages):
            content.append({"type": "image"})
            image_placed = True
            text = text.replace(IMAGE_MARK, "").strip()
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


class VisorDataCollator:
    """Batches records into model inputs with answer-only labels (see the module docstring)."""

    def __init__(self, processor, image_folder: str | None = None, max_length: int | None = None):
        self.processor = processor
        self.image_folder = image_folder or ""
        self.max_length = max_length
        tokenizer = processor.tokenizer
        ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError("the tokenizer has no <|im_start|>/<|im_end|> tokens: a Qwen2 chat tokenizer is required")
        self.im_start, self.im_end = ids
        self.assistant_prefix = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]

    def load_image(self, record: dict) -> Image.Image:
        path = os.path.join(self.image_folder, record["image"])
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"record {record.get('id')!r}: cannot read image {path}: {error}") from error

    def __call__(self, records: list[dict]) -> dict:
        texts, images = [], []
        for record in records:
            texts.append(self.processor.apply_chat_template(to_messages(record), add_generation_prompt=False))
            if record.get("image"):
                images.append(self.load_image(record))
        kwargs = {"padding": True, "return_tensors": "pt"}
        batch = self.processor(images=images or None, text=texts, **kwargs)
        batch = dict(batch)
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            raise ValueError(
                f"a batch is {batch['input_ids'].shape[1]} tokens long, over max_length={self.max_length}; "
                "image placeholders cannot be cut, so shorten the conversations or raise max_length"
            )
        batch["labels"], batch["question_index"] = self.answer_labels(batch["input_ids"], batch["attention_mask"])
        return batch

    def answer_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Label the tokens of every assistant answer; number them by question."""
        labels = torch.full_like(input_ids, -100)
        question_index = torch.full_like(input_ids, -1)
        prefix = self.assistant_prefix
        for b in range(input_ids.shape[0]):
            ids = input_ids[b].tolist()
            question, i = -1, 0
            while i < len(ids):
                if ids[i] == self.im_start and ids[i + 1 : i + 1 + len(prefix)] == prefix:
                    question += 1
                    i += 1 + len(prefix)
                    while i < len(ids) and attention_mask[b, i]:
                        labels[b, i], question_index[b, i] = ids[i], question
                        if ids[i] == self.im_end:
                            break
                        i += 1
                i += 1
        return labels, question_index
