"""Conversion of LLaVA-OneVision checkpoints to VISOR folders, and the Hub packaging of the result.

Sources are tiny random LLaVA-OneVision models written in explicit key layouts (transformers 4.x on disk, sharded
with an index; and 5.x's names), so that each transformers line reproduces both. The converted folders are loaded in
a fresh process through the Auto classes with trust_remote_code=True and HF_HUB_OFFLINE=1, and must give
LLaVA-OneVision's logits at budget="full". When the other transformers line's virtualenv sits next to this one
(.venv5 / .venv457), the same folders are loaded there too; CI runs each line alone and checks the written key
layout instead (test_written_layout_is_the_one_both_lines_load).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlavaOnevisionForConditionalGeneration

from visor_hf import VisorForConditionalGeneration
from visor_hf.configuration_visor import HUB_CODE_FILES
from visor_hf.convert_llava_ov import convert, main
from visor_hf.processing_visor import ROUTING_TOKEN
from visor_hf.testing import (
    IMAGE_TOKEN_ID,
    save_llava_onevision,
    tiny_inputs,
    tiny_llava_onevision,
    tiny_llava_onevision_config,
    tiny_tokenizer,
)

from .conftest import IMAGE_SIZES, PROMPT_LENGTHS

V5 = int(__import__("transformers").__version__.split(".")[0]) >= 5
REPO_ROOT = Path(__file__).resolve().parents[1]
# The other line's interpreter: $VISOR_OTHER_PYTHON (set by .ci/run), else the developer's sibling venv.
OTHER_PYTHON = Path(os.environ.get("VISOR_OTHER_PYTHON", REPO_ROOT / (".venv457" if V5 else ".venv5") / "bin" / "python"))
CODE_FILES = set(HUB_CODE_FILES)
AUTO_MAP = {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoProcessor"}

# Conversions under test: source layout, whether the source ties its embeddings, CLI layer options.
CASES = {
    "legacy": dict(layout="legacy", tied=True, shard=60_000, args=["--cross-attn-layers", "1,3,5"]),
    "v5": dict(layout="v5", tied=False, shard=None, args=["--cross-attn-layers", "0,2,5", "--dtype", "float32"]),
}

LOADER = r'''
import json, sys, torch, transformers
from PIL import Image
from transformers import AutoModel, AutoProcessor
if int(transformers.__version__.split(".")[0]) >= 5:
    from transformers import AutoModelForImageTextToText as AutoLM
else:
    from transformers import AutoModelForVision2Seq as AutoLM
results = {}
for folder, reference, with_processor in json.loads(sys.argv[1]):
    model, info = AutoLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    base, base_info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    ref = torch.load(reference)
    with torch.no_grad():
        logits = model.eval()(**ref["inputs"], budget="full").logits[..., : ref["expected"].shape[-1]]
    entry = {
        "class": type(model).__name__, "base_class": type(base).__name__,
        "missing": sorted(info["missing_keys"]), "base_missing": sorted(base_info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "max_diff": float((logits - ref["expected"]).abs()[ref["mask"]].max()),
    }
    if with_processor:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=Image.new("RGB", (100, 60), (200, 30, 30)), text=text, return_tensors="pt")
        out = model.generate(**inputs, budget="full", max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        entry.update(
            processor=type(processor).__name__, new_tokens=out.shape[1] - inputs["input_ids"].shape[1],
            routing_tokens=int((inputs["input_ids"] == model.config.routing_token_id).sum()),
            image_tokens=int((inputs["input_ids"] == model.config.image_token_id).sum()),
        )
    results[folder] = entry
print("RESULT " + json.dumps(results))
'''


def untied_llava_onevision(seed: int = 1) -> LlavaOnevisionForConditionalGeneration:
    """The 7B-style variant: lm_head separate from the embeddings; Qwen2's rope_theta of 1e6."""
    torch.manual_seed(seed)
    config = tiny_llava_onevision_config(tie_word_embeddings=False, rope_theta=1e6)
    config.tie_word_embeddings = False
    return LlavaOnevisionForConditionalGeneration(config).eval()


def write_v5_rope_fields(folder: Path) -> None:
    """Rewrite config.json's RoPE fields as transformers 5.x writes them (`rope_parameters` only), on either line."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    text = config["text_config"]
    theta = text.pop("rope_theta", None) or text["rope_parameters"]["rope_theta"]
    text.pop("rope_scaling", None)
    text["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    path.write_text(json.dumps(config))


def text_positions(inputs):
    return (inputs["input_ids"] != IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()


def checkpoint_keys(folder) -> dict[str, tuple]:
    keys = {}
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            keys.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return keys


def run_loader(python, jobs, tmp_path) -> dict:
    script = tmp_path / "load_converted.py"
    script.write_text(LOADER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [str(python), str(script), json.dumps(jobs)], capture_output=True, text=True, env=env, timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


# --------------------------------------------------------------------------------------------------
# Fixtures: sources, conversions through the CLI, references
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def converted(workdir):
    """{case: (llava model, source folder, converted folder, reference file)}; converted through `main(argv)`."""
    out = {}
    for name, case in CASES.items():
        llava = tiny_llava_onevision() if case["tied"] else untied_llava_onevision()
        src, dst = workdir / f"src_{name}", workdir / f"visor_{name}"
        save_llava_onevision(llava, src, layout=case["layout"], max_shard_size=case["shard"])
        if case["layout"] == "v5":
            write_v5_rope_fields(src)
        assert main(["--src", str(src), "--dst", str(dst), "--self-attn-layers", "all", "--no-progress", *case["args"]]) == 0
        inputs = tiny_inputs(llava, IMAGE_SIZES, PROMPT_LENGTHS)
        with torch.no_grad():
            expected = llava(**inputs).logits
        reference = workdir / f"reference_{name}.pt"
        torch.save({"inputs": inputs, "expected": expected, "mask": text_positions(inputs)}, reference)
        out[name] = SimpleNamespace(llava=llava, src=src, dst=dst, reference=reference)
    return out


@pytest.fixture(scope="module")
def resaved(converted, workdir):
    """The legacy conversion loaded and saved again with `model.save_pretrained` by the running transformers."""
    model = VisorForConditionalGeneration.from_pretrained(converted["legacy"].dst)
    folder = workdir / "resaved"
    model.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# 1. Converted folders load through the Auto classes and are LLaVA-OneVision at budget="full"
# --------------------------------------------------------------------------------------------------


def test_sources_are_in_the_layouts_under_test(converted):
    legacy = checkpoint_keys(converted["legacy"].src)
    assert "language_model.model.embed_tokens.weight" in legacy
    assert "vision_tower.vision_model.post_layernorm.weight" in legacy
    assert (converted["legacy"].src / "model.safetensors.index.json").is_file()
    v5 = checkpoint_keys(converted["v5"].src)
    assert "model.language_model.embed_tokens.weight" in v5 and "lm_head.weight" in v5
    assert "model.vision_tower.post_layernorm.weight" in v5


def test_converted_folders_load_in_a_fresh_process_and_match_llava_onevision(converted, resaved, tmp_path):
    jobs = [[str(c.dst), str(c.reference), True] for c in converted.values()]
    jobs.append([str(resaved), str(converted["legacy"].reference), False])
    results = run_loader(sys.executable, jobs, tmp_path)
    for folder, entry in results.items():
        assert entry["class"] == "VisorForConditionalGeneration" and entry["base_class"] == "VisorModel", folder
        assert entry["missing"] == [] and entry["base_missing"] == [] and entry["unexpected"] == [], (folder, entry)
        assert entry["max_diff"] <= 1e-4, (folder, entry)
    for case in converted.values():  # 2. processor -> generate from the loaded folder
        entry = results[str(case.dst)]
        assert entry["processor"] == "VisorProcessor"
        assert entry["new_tokens"] == 4 and entry["routing_tokens"] == 1 and entry["image_tokens"] > 16


@pytest.mark.skipif(not OTHER_PYTHON.is_file(), reason=f"no virtualenv of the other transformers line at {OTHER_PYTHON}")
def test_folders_written_here_load_in_the_other_transformers_line(converted, resaved, tmp_path):
    """Converted (and re-saved) under this line, loaded under the other: zero missing keys, same logits.
    The tokenizer is left out: tokenizer files written by 5.x do not load in 4.57 (the converter carries the source's)."""
    jobs = [[str(c.dst), str(c.reference), False] for c in converted.values()]
    jobs.append([str(resaved), str(converted["legacy"].reference), False])
    for folder, entry in run_loader(OTHER_PYTHON, jobs, tmp_path).items():
        assert entry["missing"] == [] and entry["base_missing"] == [] and entry["unexpected"] == [], (folder, entry)
        assert entry["max_diff"] <= 1e-4, (folder, entry)


def test_written_layout_is_the_one_both_lines_load(converted, resaved):
    """4.57 names SigLIP's weights `model.vision_tower.vision_model.*` (5.x loads that too); a tied lm_head is not
    written; `model.save_pretrained` of the running line writes the same keys as the converter."""
    for folder in (converted["legacy"].dst, converted["v5"].dst, resaved):
        keys = checkpoint_keys(folder)
        vision = [k for k in keys if ".vision_tower." in k]
        assert vision and all(k.startswith("model.vision_tower.vision_model.") for k in vision), folder
        for key in ("model.vision_tower.vision_model.embeddings.patch_embedding.weight",
                    "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                    "model.vision_tower.vision_model.post_layernorm.weight", "model.language_model.layers.0.mlp.up_proj.weight",
                    "model.multi_modal_projector.linear_1.weight", "model.image_newline", "model.router.fc2.bias"):
            assert key in keys, (folder, key)
        layers = json.loads((Path(folder) / "config.json").read_text())["cross_attn_layers"]
        assert {f"model.cross_attn.{layer}.gate" for layer in layers} <= set(keys)
    assert checkpoint_keys(resaved) == checkpoint_keys(converted["legacy"].dst)
    assert "lm_head.weight" not in checkpoint_keys(converted["legacy"].dst)  # tied
    assert "lm_head.weight" in checkpoint_keys(converted["v5"].dst)
    assert CODE_FILES <= {p.name for p in resaved.iterdir()}
    assert "rope_theta" in json.loads((resaved / "config.json").read_text())["text_config"]
    _, info = VisorForConditionalGeneration.from_pretrained(resaved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_converted_weights_are_the_grafted_model(converted):
    """Same weights as `from_llava_onevision` (router aside, it is random); the routing token's row is the mean."""
    case = converted["v5"]
    loaded = VisorForConditionalGeneration.from_pretrained(case.dst).state_dict()
    grafted = VisorForConditionalGeneration.from_llava_onevision(
        case.llava, cross_attn_layers=[0, 2, 5], self_attn_layers=list(range(6))
    ).state_dict()
    assert set(loaded) == set(grafted)
    for key, tensor in grafted.items():
        if ".router.fc" in key:
            continue
        if key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert loaded[key].shape == (257, 64)  # the tiny tokenizer fills the vocabulary: one row added
            assert torch.equal(loaded[key][:256], tensor)
            assert torch.allclose(loaded[key][256], tensor.mean(0), atol=1e-6)
        else:
            assert torch.equal(loaded[key], tensor), key
    assert all(float(loaded[f"model.cross_attn.{l}.gate"]) == 0.0 for l in (0, 2, 5))


def test_routing_token_and_config(converted):
    for case in converted.values():
        config = json.loads((case.dst / "config.json").read_text())
        assert set(config["auto_map"]) == AUTO_MAP
        assert config["routing_token_id"] == 256 and config["text_config"]["vocab_size"] == 257
        assert config["self_attn_layers"] == list(range(6)) and config["default_budget"] == "full"
        tokenizer = json.loads((case.dst / "tokenizer.json").read_text())
        assert {"id": 256, "content": ROUTING_TOKEN} == {k: tokenizer["added_tokens"][-1][k] for k in ("id", "content")}
    assert json.loads((converted["legacy"].dst / "config.json").read_text())["cross_attn_layers"] == [1, 3, 5]
    assert json.loads((converted["legacy"].dst / "config.json").read_text())["tie_word_embeddings"] is True
    v5 = json.loads((converted["v5"].dst / "config.json").read_text())
    assert v5["tie_word_embeddings"] is False
    # a 5.x-style source (rope_parameters only) keeps its rope_theta, written for both lines
    assert v5["text_config"]["rope_theta"] == 1e6
    assert v5["text_config"].get("rope_parameters", {"rope_theta": 1e6})["rope_theta"] == 1e6


def test_spare_embedding_row_is_used_without_resizing(workdir):
    """Like Qwen2 (151,936 rows for ~151,650 tokens): the routing token takes the next spare row."""
    llava = tiny_llava_onevision()
    src = workdir / "src_spare"
    save_llava_onevision(llava, src, layout="legacy", tokenizer=tiny_tokenizer(253))
    dst = convert(src, workdir / "visor_spare", progress=False)
    config = json.loads((dst / "config.json").read_text())
    assert config["routing_token_id"] == 253 and config["text_config"]["vocab_size"] == 256
    assert config["cross_attn_layers"] == [2, 5] and config["self_attn_layers"] == [1, 4]  # L/3 each, spread
    embed = load_file(dst / "model.safetensors")["model.language_model.embed_tokens.weight"]
    original = llava.model.language_model.embed_tokens.weight.detach()
    assert embed.shape == (256, 64) and torch.equal(embed[:253], original[:253]) and torch.equal(embed[254:], original[254:])
    assert torch.allclose(embed[253], original[:253].mean(0), atol=1e-6)


def test_hub_id_source_goes_through_snapshot_download(converted, workdir, monkeypatch):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(converted["legacy"].src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    dst = convert("someone/llava-onevision-tiny", workdir / "visor_from_hub", progress=False)
    (repo_id, patterns), = calls
    assert repo_id == "someone/llava-onevision-tiny"
    assert "*.safetensors" in patterns and not any(p.endswith((".bin", ".pt", "*")) and p != "LICENSE*" for p in patterns)
    assert "base_model: someone/llava-onevision-tiny" in (dst / "README.md").read_text()


def test_dtype_option(converted, workdir):
    dst = convert(converted["v5"].src, workdir / "visor_bf16", dtype="bfloat16", progress=False)
    with safe_open(dst / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"


def test_output_folder_has_every_hub_file(converted):
    files = {p.name for p in converted["legacy"].dst.iterdir()}
    expected = CODE_FILES | {
        "config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json",
        "tokenizer_config.json", "preprocessor_config.json", "processor_config.json", "chat_template.jinja",
    }
    assert expected <= files
    card = (converted["legacy"].dst / "README.md").read_text()
    for text in ("library_name: transformers", "license: apache-2.0", "- visor", "Cross-attention after layers",
                 "[1, 3, 5]", "| 0 | [] |", "AutoModelForImageTextToText", "AutoModelForVision2Seq", "trust_remote_code=True"):
        assert text in card, text


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--src", "--dst", "--cross-attn-layers", "--self-attn-layers", "--dtype", "--push-to-hub", "--private"):
        assert option in out
    assert "L/3" in out and "bfloat16" in out


# --------------------------------------------------------------------------------------------------
# 3. Upload: the files of the Hub commit, captured without network
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch):
    """Replace the Hub calls of huggingface_hub and transformers; record each commit's files."""
    import huggingface_hub
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import ModelCard

    commits = []

    def create_repo(*args, **kwargs):
        repo_id = kwargs.get("repo_id") or next(a for a in args if isinstance(a, str))
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def create_commit(*args, **kwargs):
        files = {}
        for op in kwargs["operations"]:
            content = op.path_or_fileobj
            files[op.path_in_repo] = Path(content).read_bytes() if isinstance(content, (str, Path)) else bytes(content)
        commits.append(SimpleNamespace(repo_id=kwargs.get("repo_id"), files=files))
        return SimpleNamespace(commit_url="https://huggingface.co/commit/0", oid="0" * 40, pr_url=None)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: create_repo(*a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, *a, **k: create_commit(*a, **k))
    # 4.57 calls huggingface_hub's module-level functions, bound to an HfApi instance at import time
    monkeypatch.setattr(transformers_hub, "create_repo", create_repo, raising=False)
    monkeypatch.setattr(transformers_hub, "create_commit", create_commit, raising=False)
    monkeypatch.setattr(
        transformers_hub, "create_and_tag_model_card",
        lambda *a, **k: ModelCard("---\nlibrary_name: transformers\n---\n"), raising=False,
    )
    return commits


def assert_complete_repo(files: dict):
    names = set(files)
    assert CODE_FILES <= names, names
    assert any(n.endswith(".safetensors") for n in names)
    assert {"config.json", "tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json"} <= names
    assert set(json.loads(files["config.json"])["auto_map"]) == AUTO_MAP


def test_cli_push_uploads_model_processor_code_and_card_in_one_commit(converted, workdir, hub):
    assert main(["--src", str(converted["legacy"].src), "--dst", str(workdir / "visor_pushed"), "--no-progress",
                 "--push-to-hub", "someone/visor-tiny", "--private"]) == 0
    assert len(hub) == 1 and hub[0].repo_id == "someone/visor-tiny"
    files = hub[0].files
    assert_complete_repo(files)
    assert {"README.md", "preprocessor_config.json", "generation_config.json"} <= set(files)
    assert b"someone/visor-tiny" in files["README.md"]


def test_model_and_processor_push_to_hub(converted, hub):
    from visor_hf.processing_visor import VisorProcessor

    model = VisorForConditionalGeneration.from_pretrained(converted["legacy"].dst)
    processor = VisorProcessor.from_pretrained(converted["legacy"].dst)
    model.push_to_hub("someone/visor-trained")
    processor.push_to_hub("someone/visor-trained")
    files = {**hub[0].files, **hub[1].files}
    assert_complete_repo(files)
    assert CODE_FILES <= set(hub[0].files)
    assert "processing_visor.py" in hub[1].files
    processor_config = json.loads(files["processor_config.json"])
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_visor.VisorProcessor"
    assert processor_config["routing_token"] == ROUTING_TOKEN


# --------------------------------------------------------------------------------------------------
# 4. Errors name what is wrong
# --------------------------------------------------------------------------------------------------


def source_variant(source: Path, folder: Path, edit) -> Path:
    """A copy of a single-file source whose state dict went through `edit`."""
    shutil.copytree(source, folder)
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_source_that_is_not_llava_onevision(workdir):
    folder = workdir / "qwen2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ValueError, match=r"is not LLaVA-OneVision: .*model_type='qwen2'"):
        convert(folder, workdir / "out_qwen2", progress=False)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        convert(str(workdir / "does-not-exist"), workdir / "out_none", progress=False)


def test_missing_key(converted, workdir):
    src = source_variant(converted["v5"].src, workdir / "missing", lambda s: s.pop("model.image_newline"))
    with pytest.raises(ValueError, match=r"Missing: \['model.image_newline'\]"):
        convert(src, workdir / "out_missing", progress=False)
    assert not (workdir / "out_missing").exists()  # checked before anything is written


def test_unexpected_key(converted, workdir):
    src = source_variant(converted["v5"].src, workdir / "unexpected", lambda s: s.__setitem__("extra.head.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unexpected keys .*extra\.head\.weight"):
        convert(src, workdir / "out_unexpected", progress=False)


def test_shape_mismatch(converted, workdir):
    key = "model.multi_modal_projector.linear_2.bias"
    src = source_variant(converted["v5"].src, workdir / "shape", lambda s: s.__setitem__(key, torch.zeros(65)))
    with pytest.raises(ValueError, match=r"linear_2\.bias has shape \(65,\), config\.json implies \(64,\)"):
        convert(src, workdir / "out_shape", progress=False)


def test_pickle_weights_are_refused(converted, workdir):
    folder = workdir / "pickled"
    folder.mkdir()
    shutil.copyfile(converted["v5"].src / "config.json", folder / "config.json")
    torch.save({"image_newline": torch.zeros(64)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickle weights \['pytorch_model.bin'\].*safetensors"):
        convert(folder, workdir / "out_pickled", progress=False)


@pytest.mark.parametrize("argv, code, message", [
    (["--dtype", "float64"], 2, "invalid choice: 'float64'"),
    (["--cross-attn-layers", "2,x"], 1, "expected comma-separated layer indices"),
    (["--self-attn-layers", "1,99"], 1, "self_attn_layers=[1, 99]: indices [99] are outside the allowed range 0..5"),
    (["--max-shard-size", "lots"], 1, "max_shard_size='lots'"),
    (["--private"], 2, "--private needs --push-to-hub"),
])
def test_unknown_flag_values(converted, workdir, capsys, argv, code, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--src", str(converted["v5"].src), "--dst", str(workdir / "out_flags"), "--no-progress", *argv])
    assert exit_info.value.code == code
    assert message in capsys.readouterr().err


def test_loading_a_folder_with_a_missing_weight_is_an_error(converted, workdir):
    """Nothing is loaded half-way: 4.57 would otherwise initialise the missing tower randomly with a warning."""
    folder = workdir / "visor_missing_weight"
    shutil.copytree(converted["v5"].dst, folder)
    state = load_file(folder / "model.safetensors")
    state.pop("model.vision_tower.vision_model.post_layernorm.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights .*post_layernorm\.weight"):
        VisorForConditionalGeneration.from_pretrained(folder)
