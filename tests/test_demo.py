"""The demo (`python -m visor_hf.demo`): the questions it lists, its warning for words the tokenizer does not know, and
the README's demo commands answering correctly with the kept checkpoint.

Expected outputs come from the toy world (`world.ask` on `world.demo_scene()`) or are written out here, never from
the demo's own printout.
"""

from __future__ import annotations

import os
import pathlib
import random
import re
import shlex

import pytest

from visor_hf import demo
from visor_hf.toyworld import world

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_checkpoint = pytest.mark.skipif(not os.path.exists(os.path.join(demo.DEFAULT_MODEL, "config.json")),
                                      reason="no kept checkpoint yet")


def demo_scene_questions() -> dict[str, tuple[str, str]]:
    """{family: (question, answer)} about the demo scene, straight from the toy world."""
    scene = world.demo_scene()
    return {family: world.ask(scene, family, random.Random(0)) for family in world.FAMILIES}


def demo_scene_answers() -> dict[str, str]:
    return dict(demo_scene_questions().values())


def run_demo(capsys, *argv) -> tuple[str, str]:
    demo.main(list(argv))
    captured = capsys.readouterr()
    return captured.out, captured.err


def question_answers(out: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of the demo's printout, the answer without the notes after it."""
    return [(q, a.split("   (")[0]) for q, a in re.findall(r"^Q: (.*)\nA: (.*)$", out, re.M)]


# --------------------------------------------------------------------------------------------------
# --list-questions
# --------------------------------------------------------------------------------------------------


def listed(out: str) -> list[tuple[str, str, str]]:
    return re.findall(r"^  (coarse|fine)\s+(\w+)\s+(.+)$", out, re.M)


def test_list_questions_prints_every_family_with_its_kind_and_loads_no_model(capsys, monkeypatch):
    monkeypatch.setattr(demo, "load", lambda *a: pytest.fail("--list-questions loaded a model"))
    out, _ = run_demo(capsys, "--list-questions")
    assert listed(out) == [(world.KIND[f], f, question) for f, (question, _) in demo_scene_questions().items()]


def test_list_questions_follows_the_toy_world(capsys, monkeypatch):
    """A family added to the world is listed: the list is read from world.py, not copied into the demo."""
    ask = world.ask

    def ask_with_a_new_family(scene, family, rng):
        if family == "colour_small":
            return "what colour is the small shape?", "red"
        return ask(scene, family, rng)

    monkeypatch.setattr(world, "FAMILIES", world.FAMILIES + ("colour_small",))
    monkeypatch.setattr(world, "KIND", {**world.KIND, "colour_small": "fine"})
    monkeypatch.setattr(world, "ask", ask_with_a_new_family)
    out, _ = run_demo(capsys, "--list-questions")
    assert listed(out)[-1] == ("fine", "colour_small", "what colour is the small shape?")
    assert len(listed(out)) == len(world.FAMILIES)


# --------------------------------------------------------------------------------------------------
# Words the tokenizer does not know
# --------------------------------------------------------------------------------------------------


def test_unknown_words_of_the_toy_tokenizer():
    from visor_hf.toyworld.model import build_tokenizer

    tokenizer = build_tokenizer()
    # the failure seen: tokenised to "<unk> is <unk> the <unk> ?" and answered silently
    assert demo.unknown_words(tokenizer, "What is in the image?") == ["What", "in", "image"]
    assert demo.unknown_words(tokenizer, "what colour is the  large hexagon? the hexagon!") == ["hexagon", "!"]
    for question in demo_scene_answers():
        assert demo.unknown_words(tokenizer, question) == [], question


def byte_level_bpe_tokenizer():
    """A tokenizer built like Qwen2's (byte-level BPE, the 256 byte symbols in its vocabulary, unk_token set the way
    Qwen2TokenizerFast defaults it), offline: no merges, so words are split into bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_unknown_words_never_fire_for_a_byte_level_bpe_tokenizer():
    tokenizer = byte_level_bpe_tokenizer()
    assert tokenizer.unk_token_id is not None
    for text in ("What is in the image?", "Ünïcödé, 数字 and 😀 — tabs\tand\nnewlines", "hexagon!"):
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]  # the premise
        assert demo.unknown_words(tokenizer, text) == []


@needs_checkpoint
def test_demo_warns_naming_unknown_words_and_still_answers(capsys):
    answers = demo_scene_answers()
    known = "what shape is the large shape?"
    out, err = run_demo(capsys, "--question", "What is in the image?", "--question", known, "--budget", "0")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err  # one question with unknown words, one warning
    assert "'What', 'in', 'image'" in warnings[0] and "it knows 'what'" in warnings[0]
    assert "python -m visor_hf.demo --list-questions" in warnings[0]
    (q1, a1), (q2, a2) = question_answers(out)
    # what the model makes of `<unk> is <unk> the <unk> ?` is its own business: a word of the world, or nothing
    assert q1 == "What is in the image?"
    assert a1 in set(world.COLOURS) | set(world.SHAPES) | set(world.COUNTS) | {"left", "right", demo.EMPTY_ANSWER}
    assert "unknown words: see the warning" in out.split("Q: " + known)[0]
    assert (q2, a2) == (known, answers[known])  # on the demo scene a known question prints its reference too
    assert f"A: {answers[known]}   (reference: {answers[known]})\n" in out


# --------------------------------------------------------------------------------------------------
# The README's demo commands
# --------------------------------------------------------------------------------------------------


def readme_demo_commands() -> list[list[str]]:
    """The arguments of every `python -m visor_hf.demo` command in the README's section on the kept checkpoint."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Try it: a VISOR model that ships with the package")[1].split("\n## ")[0]
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["python", "-m", "visor_hf.demo"]:
                commands.append(words[3:])
    return commands


def option(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == name]


@needs_checkpoint
def test_readme_demo_commands_answer_correctly(capsys, tmp_path, monkeypatch):
    from PIL import Image, ImageChops

    monkeypatch.chdir(tmp_path)
    commands = readme_demo_commands()
    asked = [q for argv in commands for q in option(argv, "--question")]
    answers = demo_scene_answers()
    assert asked and set(asked) <= set(answers), "README asks a question the toy world does not"
    kinds_asked = {world.KIND[f] for f, (question, _) in demo_scene_questions().items() if question in asked}
    assert kinds_asked == {"coarse", "fine"}
    assert ["--list-questions"] in commands
    demo_scene_files = set()
    checked = 0
    for argv in commands:
        out, err = run_demo(capsys, *argv)
        assert "warning" not in err, (argv, err)
        for path in option(argv, "--save-image"):
            if not option(argv, "--image"):
                demo_scene_files.add(path)
            with Image.open(path) as saved:
                assert ImageChops.difference(saved.convert("RGB"), world.render(world.demo_scene())).getbbox() is None
        for path in option(argv, "--image"):
            assert path in demo_scene_files, f"README uses {path} before a command saves the demo scene there"
        for question, answer in question_answers(out):
            assert answer == answers[question], (argv, question, out)
            checked += 1
    assert checked >= len(asked) + 2  # the default run's two questions and every --question
