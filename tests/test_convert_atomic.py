"""The converter never loses a user's files and never leaves a half-written or mixed folder (issue 17).

- A non-empty `--dst` is refused without `--overwrite`, and its files survive.
- With `--overwrite`, the new folder replaces the old one whole: no stale weight file of the old conversion stays.
- Every problem found in the source (missing processor files, a truncated file, a NaN, an integer weight) stops the
  conversion before `--dst` changes, with an error naming the file.
- Killed (SIGKILL, in a subprocess) at several points of a conversion over an earlier one, `--dst` afterwards holds
  exactly one complete conversion, the old or the new, byte for byte.
- The new parameters and their initialisation come from the model (`new_parameters()` / `init_new_parameters()`).
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import visor_hf.convert_llava_ov as convert_module
from visor_hf import VisorForConditionalGeneration
from visor_hf.convert_llava_ov import convert, main
from visor_hf.testing import save_llava_onevision, tiny_llava_onevision

SMALL_SHARDS = 100_000  # bytes: the tiny model in ~14 files, so that a kill can land between two of them


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two tiny LLaVA-OneVision checkpoints (different weights) and a complete conversion of each: the old one in a
    single weight file, the new one sharded, so that a mix of the two would show."""
    root = tmp_path_factory.mktemp("atomic")
    for name, seed in (("src_old", 0), ("src_new", 1)):
        save_llava_onevision(tiny_llava_onevision(seed=seed), root / name, layout="v5")
    old = convert(root / "src_old", root / "ref_old", progress=False)
    new = convert(root / "src_new", root / "ref_new", progress=False, max_shard_size=SMALL_SHARDS)
    return SimpleNamespace(root=root, old_src=root / "src_old", new_src=root / "src_new", old=old, new=new)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.converting-*"))


def which_conversion(dst: Path, sources) -> str:
    """'old' or 'new' when `dst` is exactly that complete conversion (same files, same bytes) and loads."""
    found = folder_bytes(dst)
    matches = [name for name in ("old", "new") if found == folder_bytes(getattr(sources, name))]
    assert matches, f"{dst} is neither complete conversion: {sorted(found)}"
    VisorForConditionalGeneration.from_pretrained(dst)  # and it loads (strictly: a missing weight is an error)
    return matches[0]


def test_conversions_are_reproducible(sources, tmp_path):
    """Same source, same options -> byte-identical folder (the router's random start is seeded): what makes
    "exactly the old or the new conversion" checkable."""
    again = convert(sources.new_src, tmp_path / "again", progress=False, max_shard_size=SMALL_SHARDS)
    assert folder_bytes(again) == folder_bytes(sources.new)


# --------------------------------------------------------------------------------------------------
# A user's folder
# --------------------------------------------------------------------------------------------------


def test_non_empty_dst_is_refused_and_the_users_files_survive(sources, tmp_path, capsys):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "README.md").write_text("my notes")
    (dst / "config.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match=r"--dst .*mine is not empty .*README\.md.*pass --overwrite"):
        convert(sources.old_src, dst, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--src", str(sources.old_src), "--dst", str(dst), "--no-progress"])
    assert exit_info.value.code == 1 and "is not empty" in capsys.readouterr().err
    assert folder_bytes(dst) == {"README.md": b"my notes", "config.json": b'{"mine": true}'}
    assert leftovers(dst) == []


def test_empty_dst_folder_is_used(sources, tmp_path):
    dst = tmp_path / "empty"
    dst.mkdir()
    assert which_conversion(convert(sources.old_src, dst, progress=False), sources) == "old"


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "rename-aside"])
def test_overwrite_replaces_the_whole_folder(sources, tmp_path, monkeypatch, exchange):
    """An earlier single-file conversion and a user's file are gone: no stale model.safetensors beside new shards.
    Also where renameat2's exchange is unavailable (the old folder renamed aside first)."""
    if not exchange:
        monkeypatch.setattr(convert_module, "exchange_paths", lambda a, b: False)
    dst = tmp_path / "visor"
    shutil.copytree(sources.old, dst)
    (dst / "notes.txt").write_text("an earlier file")
    assert main(["--src", str(sources.new_src), "--dst", str(dst), "--overwrite", "--no-progress",
                 "--max-shard-size", str(SMALL_SHARDS)]) == 0
    assert which_conversion(dst, sources) == "new"
    assert not (dst / "model.safetensors").exists() and not (dst / "notes.txt").exists()
    assert leftovers(dst) == []


def test_dst_holding_the_source_is_refused(sources, tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(sources.old_src, parent / "src")
    with pytest.raises(ValueError, match=r"contains the source"):
        convert(parent / "src", parent, progress=False, overwrite=True)
    assert (parent / "src" / "config.json").is_file()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match=r"a_file is a file, not a folder"):
        convert(sources.old_src, tmp_path / "a_file", progress=False)


def test_leftovers_of_a_killed_conversion_are_removed_by_the_next_one(sources, tmp_path):
    dst = tmp_path / "visor"
    dead = tmp_path / f".visor.converting-{2**22 + 12345}-abc"  # above Linux's default pid_max: no such process
    alive = tmp_path / f".visor.converting-{os.getpid()}-abc"  # a conversion under way: left alone
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    convert(sources.old_src, dst, progress=False)
    assert leftovers(dst) == [alive.name]


# --------------------------------------------------------------------------------------------------
# Bad sources stop the conversion before `--dst` changes
# --------------------------------------------------------------------------------------------------


def edited_source(sources, folder: Path, edit_state=None, remove=()) -> Path:
    shutil.copytree(sources.new_src, folder)
    for name in remove:
        (folder / name).unlink()
    if edit_state is not None:
        state = load_file(folder / "model.safetensors")
        edit_state(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def assert_old_folder_untouched(dst: Path, sources) -> None:
    assert which_conversion(dst, sources) == "old"
    assert leftovers(dst) == []


def set_nan(state):
    state["model.language_model.layers.3.mlp.up_proj.weight"][2, 5] = float("nan")


def set_int(state):
    state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(64, dtype=torch.int64)


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


BAD_SOURCES = {
    # case: (edit of the state dict, files removed, edit of the folder, error type, phrase of the message)
    "no-preprocessor-config": (None, ["preprocessor_config.json"], None, ValueError,
                               r"has no image processor config: expected preprocessor_config\.json"),
    "no-tokenizer": (None, ["tokenizer_config.json"], None, ValueError, r"has no tokenizer \(tokenizer_config\.json\)"),
    "nan-weight": (set_nan, [], None, ValueError,
                   r"model\.safetensors: tensor model\.language_model\.layers\.3\.mlp\.up_proj\.weight "
                   r"has 1 non-finite"),
    "integer-weight": (set_int, [], None, ValueError,
                       r"model\.safetensors stores model\.multi_modal_projector\.linear_2\.bias as I64; .*floating"),
    "truncated-file": (None, [], truncate, ValueError,
                       r"model\.safetensors: not a readable safetensors file, truncated or corrupt\?"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_changes_nothing(sources, tmp_path, case):
    edit_state, remove, edit_folder, error, message = BAD_SOURCES[case]
    src = edited_source(sources, tmp_path / "src", edit_state, remove)
    if edit_folder:
        edit_folder(src)
    fresh, dst = tmp_path / "fresh", tmp_path / "visor"
    with pytest.raises(error, match=message):
        convert(src, fresh, progress=False)
    assert not fresh.exists() and leftovers(fresh) == []  # nothing written
    shutil.copytree(sources.old, dst)
    with pytest.raises(error, match=message):
        convert(src, dst, progress=False, overwrite=True)
    assert_old_folder_untouched(dst, sources)


# --------------------------------------------------------------------------------------------------
# VISOR's new parameters: named and initialised by the model
# --------------------------------------------------------------------------------------------------


def test_new_weights_are_the_models_new_parameters_started_as_the_model_starts_them(sources):
    """The converter asks `new_parameters()`; `init_new_parameters()` with the source's self-attention gives the
    cross-attention projections, zero gates and CPE, unit norms."""
    model = VisorForConditionalGeneration.from_pretrained(sources.new)
    written = load_file(sources.new / "model-00001-of-00014.safetensors")
    for file in sorted(sources.new.glob("model-*.safetensors")):
        written.update(load_file(file))
    new = model.new_parameters()
    assert new and set(new) <= set(written)
    assert {k for k in written if ".cross_attn." in k or ".router." in k} == set(new)  # nothing missed, nothing more
    reference = model.__class__(model.config)  # a fresh model: its own init, then copies of its own self-attention
    reference.load_state_dict(model.state_dict())
    reference.init_new_parameters()
    for name, param in reference.new_parameters().items():
        if ".router.fc" not in name:  # the router starts random (seeded in the converter)
            assert torch.equal(written[name], param.detach()), name
    for layer in model.config.cross_attn_layers:
        assert float(written[f"model.cross_attn.{layer}.gate"]) == 0.0
        self_q = written[f"model.language_model.layers.{layer}.self_attn.q_proj.weight"]
        assert torch.equal(written[f"model.cross_attn.{layer}.q_proj.weight"], self_q)
    assert not hasattr(convert_module, "NEW_PARAMETERS") and not hasattr(convert_module, "NEW_PREFIXES")


# --------------------------------------------------------------------------------------------------
# Killed at any moment: the old folder or the new one, never a mix
# --------------------------------------------------------------------------------------------------

# Runs the CLI in a fresh process; at the point named by argv[1] it says so on stdout and waits to be killed.
CHILD = r'''
import sys, time
import visor_hf.convert_llava_ov as conv

point, argv = sys.argv[1], sys.argv[2:]

def pause():
    print(f"AT {point}", flush=True)
    time.sleep(600)

def after_nth(function, n):
    calls = []
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        calls.append(1)
        if len(calls) == n:
            pause()
        return result
    return wrapped

def before(function):
    def wrapped(*args, **kwargs):
        pause()
        return function(*args, **kwargs)
    return wrapped

if point.startswith("shard-"):      # the staging folder holds some of the new shards
    conv.save_file = after_nth(conv.save_file, int(point.removeprefix("shard-")))
elif point == "verified":           # the new folder is complete and verified, not yet in place
    conv.publish = before(conv.publish)
elif point == "swapped":            # the new folder is in place, the old one not yet deleted
    conv.remove_folder = before(conv.remove_folder)
print("READY", flush=True)
sys.exit(conv.main(argv))
'''


def run_child(script: Path, point: str, argv: list[str], kill_after: float | None = None) -> str:
    """Start the child; SIGKILL it when it reports `point` (or after `kill_after` seconds). Returns how it ended."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen([sys.executable, str(script), point, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        if kill_after is not None:
            try:
                child.wait(timeout=kill_after)
                return "finished"
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
                return "killed"
        for line in child.stdout:  # blocks until the child reaches the point (or ends)
            if line.strip() == f"AT {point}":
                child.send_signal(signal.SIGKILL)
                return "killed"
        return "finished"
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdout.close()


@pytest.mark.slow
def test_killed_conversion_leaves_the_old_folder_or_the_new_one(sources, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    dst = tmp_path / "visor"
    argv = ["--src", str(sources.new_src), "--dst", str(dst), "--overwrite", "--no-progress",
            "--max-shard-size", str(SMALL_SHARDS)]
    expected = {"shard-3": "old", "verified": "old", "swapped": "new", "none": "new"}
    started = time.monotonic()
    for point, result in expected.items():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(sources.old, dst)
        ended = run_child(script, point, argv)
        assert ended == ("finished" if point == "none" else "killed"), point
        assert which_conversion(dst, sources) == result, point
        # a killed conversion leaves its hidden folder beside --dst (removed by the next conversion to it)
        assert bool(leftovers(dst)) == (point != "none"), point
    full_run = (time.monotonic() - started) / len(expected)  # about one child's life, import included
    for delay in (random.Random(17).uniform(0.6, 1.0) * full_run,):  # and at a moment nobody chose
        shutil.rmtree(dst)
        shutil.copytree(sources.old, dst)
        run_child(script, "none", argv, kill_after=delay)
        assert which_conversion(dst, sources) in ("old", "new"), delay
    convert(sources.new_src, dst, progress=False, overwrite=True, max_shard_size=SMALL_SHARDS)
    assert which_conversion(dst, sources) == "new" and leftovers(dst) == []
