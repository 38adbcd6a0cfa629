"""Training data in LLaVA's conversation format, turned into VISOR inputs.

A data file is JSON (a list) or JSONL of records:

    {"id": "0", "image": "relative/path.png",
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}

`image` is optional (text-only records) and relative to `--image_folder`; conversations may have many
turns. The collator renders each record with the processor's chat template (which appends the routing
token after each question), runs the processor, and builds:

- `labels`: the answer tokens of every assistant turn (through its `<|im_end|>`), -100 elsewhere;
- `question_index`: for every label token, which question (0, 1, ...) it answers, -1 elsewhere.

The whole file is checked before training starts (`load_records`): every record parses, names known speakers,
has at least one answer turn and, when it has an image, the image file exists. The bad records (line numbers and
ids, the first few) are reported in one error, so a run never trains at loss 0 or dies on a missing image hours in.

Usage:
    dataset = load_records("train.jsonl", image_folder="images/")
    collator = VisorDataCollator(processor, image_folder="images/")
    batch = collator([dataset[0], dataset[1]])
"""

from __future__ import annotations

import json
import os

import torch
from PIL import Image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_MARK = "<image>"
MAX_REPORTED = 5  # bad records listed in the error; the count says how many more


def load_records(path: str, image_folder: str | None = None):
    """A `datasets.Dataset` of the records in a JSON (a list) or JSONL file, all checked first (`check_record`).

    `image_folder`: what the records' image paths are relative to ("" for the working directory); every image is
    checked to exist there. None leaves images unchecked (the collator still names a record whose image is missing
    when it is drawn); the training commands always pass it.
    Raises ValueError naming the file and the bad records (line and id, the first few, and how many in all)."""
    import datasets

    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    records, problems = parse_records(path)
    total = len(records) + len(problems)  # unparsable entries count as records
    for where, record in records:
        found = check_record(record, image_folder)
        if found:
            problems.append((where, record.get("id"), "; ".join(found)))
    if problems:
        raise ValueError(describe_problems(path, sorted(problems, key=position), total))
    if not records:
        raise ValueError(f"data file {path} holds no records")
    rows = [record for _, record in records]
    columns = {key: None for row in rows for key in row}  # every record gets every column (None where absent)
    try:
        return datasets.Dataset.from_list([{**columns, **row} for row in rows])
    except (TypeError, ValueError) as error:  # pyarrow's errors derive from these
        raise ValueError(
            f"data file {path}: a field holds values of different types across records ({error})"
        ) from error


def parse_records(path: str) -> tuple[list, list]:
    """([(where, record)], [(where, id, problem)]): a JSON list file as a whole, JSONL line by line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            return [], [(f"line {error.lineno}", None, f"not JSON: {error.msg} (column {error.colno})")]
        lines = [(f"record {i}", item) for i, item in enumerate(data)]
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    lines.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    lines.append((f"line {number}", error))
    records, problems = [], []
    for where, item in lines:
        if isinstance(item, json.JSONDecodeError):
            problems.append((where, None, f"not JSON: {item.msg} (column {item.colno})"))
        elif not isinstance(item, dict):
            problems.append((where, None, f"a record is a JSON object, this is a {type(item).__name__}"))
        else:
            records.append((where, item))
    return records, problems


def check_record(record: dict, image_folder: str | None) -> list[str]:
    """What is wrong with one record (empty when nothing): its turns, its answers, its image."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return ["no 'conversations' list of turns"]
    problems = []
    for i, turn in enumerate(turns):
        well_formed = isinstance(turn, dict) and all(isinstance(turn.get(k), str) for k in ("from", "value"))
        if not well_formed:
            problems.append(f"turn {i} is not {{'from': speaker, 'value': text}}")
        elif turn["from"] not in ROLES:
            problems.append(f"turn {i} has unknown speaker {turn['from']!r}; allowed: {sorted(ROLES)}")
    speakers = [ROLES.get(turn["from"]) for turn in turns if isinstance(turn, dict) and isinstance(turn.get("from"), str)]
    if "assistant" not in speakers:
        problems.append("no answer turn (from 'gpt' or 'assistant'): it would train nothing")
    image = record.get("image")
    marked = any(IMAGE_MARK in str(turn.get("value")) for turn in turns if isinstance(turn, dict))
    if not image:
        if marked:
            problems.append(f"{IMAGE_MARK} in its text but no 'image' field")
    elif not isinstance(image, str):
        problems.append(f"'image' is {image!r}: one file name per record is supported")
    elif image_folder is not None and not os.path.isfile(os.path.join(image_folder, image)):
        path = os.path.join(image_folder, image)
        problems.append(f"image {path} not found" + ("" if image_folder else " (no --image_folder given)"))
    return problems


def position(problem: tuple) -> int:
    """File order of a problem ("line 12" / "record 3")."""
    return int(problem[0].rsplit(" ", 1)[1])


def describe_problems(path: str, problems: list, num_records: int) -> str:
    """One message for every bad record: how many, and the first few with their line (or index) and id."""
    shown = [
        f"  {where}" + (f" (id {record_id!r})" if record_id is not None else "") + f": {problem}"
        for where, record_id, problem in problems[:MAX_REPORTED]
    ]
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return (
        f"data file {path}: {len(problems)} of {num_records} records cannot be trained on; fix them before training:\n"
        + "\n".join(shown) + more
    )


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
