"""Convert a LLaVA-OneVision checkpoint (Hub id or folder) into a VISOR checkpoint that anyone loads with
`trust_remote_code=True`, on transformers 4.57 and 5.x.

    python -m visor_hf.convert_llava_ov --src llava-hf/llava-onevision-qwen2-0.5b-ov-hf --dst ./visor-ov-0.5b
    convert("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "./visor-ov-0.5b", dtype="bfloat16")

Design choices:
- Declarative. `KEY_MAP` renames each source key to its VISOR checkpoint key; it covers the layouts checkpoints come
  in: transformers 4.x on disk (`language_model.model.*`, `language_model.lm_head`, `vision_tower.vision_model.*`,
  `multi_modal_projector.*`, `image_newline`), 5.x on disk (SigLIP without `vision_model.`) and the `model.*` names
  of 4.52+/5.x in memory. `NEW_PARAMETERS` says how each VISOR-only weight starts. The expected keys and shapes are
  those of `VisorForConditionalGeneration` built on the meta device; a missing, unexpected or doubled key, or any
  shape mismatch, is a `ValueError` naming it, before anything is written.
- Streaming. Keys and shapes come from the safetensors headers; tensors are read one at a time (`safe_open`) into the
  output shard being written and released with it, so peak memory stays near one shard (`--max-shard-size`), well
  under a copy of the weights. Pickle `.bin` checkpoints are refused: unpickling can run code.
- On-disk layout: 4.57's (`VisorPreTrainedModel.checkpoint_key`, SigLIP under `vision_tower.vision_model.`), which
  both lines load with zero missing keys; `lm_head.weight` is not written when the embeddings are tied.
- New parts start as identity, as `VisorForConditionalGeneration.from_llava_onevision` makes them: gates and CPE at
  zero, norms at one, cross-attention projections copied from the same layer's self-attention, router MLP with the
  usual normal(0, initializer_range) weights (untrained: the default budget stays "full").
- Routing token `<|visor_route|>`: added to the tokenizer as a special token at the next free id by editing the
  source's tokenizer files in place (they are carried as they are, so 4.57 and 5.x both read them), and
  `config.routing_token_id` set. Its embedding row (and lm_head row when untied) starts at the mean of the rows the
  tokenizer uses; the embedding grows by one row only if that id is past the vocabulary (Qwen2 has spare rows).
- Output folder: weights (+ index when sharded), `config.json` (full `auto_map`, RoPE fields of both lines),
  `generation_config.json`, the three Hub code files, processor files (tokenizer files, `preprocessor_config.json`,
  `processor_config.json`, `chat_template.jinja`), LICENSE files, and a model card. `--push-to-hub` uploads the folder
  in one commit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .configuration_visor import VisorConfig
from .model_card import model_card, source_license
from .modeling_visor import VisorForConditionalGeneration, VisorPreTrainedModel
from .processing_visor import CHAT_TEMPLATE, IMAGE_TOKEN, ROUTING_TOKEN, VisorProcessor

# Source key -> VISOR checkpoint key; the first matching pattern wins.
KEY_MAP = [
    # transformers 4.x on disk (and what 5.x writes for LLaVA-OneVision, except SigLIP's `vision_model.`)
    (r"^language_model\.model\.(.+)$", r"model.language_model.\1"),
    (r"^language_model\.lm_head\.(.+)$", r"lm_head.\1"),
    (r"^vision_tower\.vision_model\.(.+)$", r"model.vision_tower.vision_model.\1"),
    (r"^vision_tower\.(.+)$", r"model.vision_tower.vision_model.\1"),
    (r"^multi_modal_projector\.(.+)$", r"model.multi_modal_projector.\1"),
    (r"^image_newline$", r"model.image_newline"),
    # the `model.*` names of transformers >= 4.52 / 5.x in memory
    (r"^model\.language_model\.(.+)$", r"model.language_model.\1"),
    (r"^model\.vision_tower\.vision_model\.(.+)$", r"model.vision_tower.vision_model.\1"),
    (r"^model\.vision_tower\.(.+)$", r"model.vision_tower.vision_model.\1"),
    (r"^model\.multi_modal_projector\.(.+)$", r"model.multi_modal_projector.\1"),
    (r"^model\.image_newline$", r"model.image_newline"),
    (r"^lm_head\.(.+)$", r"lm_head.\1"),
]

# VISOR-only weights (keys under these prefixes) and how each starts.
NEW_PREFIXES = ("model.cross_attn.", "model.router.")
NEW_PARAMETERS = [
    (r"^model\.cross_attn\.(\d+)\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$",
     r"copy:model.language_model.layers.\1.self_attn.\2.\3"),
    (r"^model\.cross_attn\.\d+\.gate$", "zeros"),
    (r"^model\.cross_attn\.\d+\.cpe\.(weight|bias)$", "zeros"),
    (r"^model\.cross_attn\.\d+\.(visual_norm|text_norm)\.weight$", "ones"),
    (r"^model\.router\.norm\.weight$", "ones"),
    (r"^model\.router\.fc\d\.weight$", "normal"),
    (r"^model\.router\.fc\d\.bias$", "zeros"),
]

EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model",
)
CODE_FILES = ("configuration_visor.py", "modeling_visor.py", "processing_visor.py")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "README.md", "LICENSE*"]


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def parse_layers(value, num_layers: int | None = None, name: str = "layers") -> list[int] | None:
    """`None`, "all", "2,5,8" or a list of ints -> sorted list of ints (None keeps the default placement)."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else sorted(int(v) for v in value)
    text = str(value).strip()
    if text == "all":
        if num_layers is None:
            raise ValueError(f"{name}='all' needs the number of layers")
        return list(range(num_layers))
    if text == "":
        return []
    try:
        return sorted(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected comma-separated layer indices like 2,5,8, or 'all'") from None


def parse_dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"dtype={value!r} is not allowed: use one of {sorted(DTYPES)}")
    return DTYPES[value]


def parse_size(value) -> int:
    """Bytes from an int or a string such as "2GB", "500MB"."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(value), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={value!r}: expected bytes or a size such as 2GB or 500MB")
    units = {None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return int(float(match.group(1)) * units[match.group(2).upper() if match.group(2) else None])


# --------------------------------------------------------------------------------------------------
# Source checkpoint
# --------------------------------------------------------------------------------------------------


def resolve_source(src) -> Path:
    """A local folder as it is; anything else is a Hub id, downloaded (and cached) by huggingface_hub."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or str(src).startswith((".", "/", "~")) or str(src).count("/") > 1:
        raise FileNotFoundError(f"--src {src}: not a folder, and not a Hub id of the form owner/name")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(src), allow_patterns=HUB_PATTERNS))
    except Exception as error:  # offline, unknown repo, gated...: say which source failed
        raise OSError(f"--src {src}: could not download it from the Hub ({type(error).__name__}: {error})") from error


def read_llava_config(src_dir: Path, src) -> dict:
    path = src_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{src} is not a transformers checkpoint: it has no config.json")
    config = json.loads(path.read_text())
    if config.get("model_type") != "llava_onevision":
        raise ValueError(
            f"{src} is not LLaVA-OneVision: its config.json has model_type={config.get('model_type')!r} "
            f"(architectures {config.get('architectures')}); expected 'llava_onevision'"
        )
    return config


@dataclass
class SourceTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def index_source_weights(src_dir: Path, src) -> dict[str, SourceTensor]:
    """Every tensor of the source safetensors files, from their headers (nothing is loaded)."""
    index_file = src_dir / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted({src_dir / name for name in weight_map.values()})
        missing_files = [f.name for f in files if not f.is_file()]
        if missing_files:
            raise ValueError(f"{src}: model.safetensors.index.json names shard files that are absent: {missing_files}")
    else:
        weight_map = None
        files = sorted(src_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in src_dir.glob("*.bin")) + sorted(p.name for p in src_dir.glob("*.pt*"))
        found = f"only pickle weights {pickles}" if pickles else "no weights"
        raise ValueError(
            f"{src} has {found}: only safetensors checkpoints are read (unpickling a .bin file can run code). "
            "Convert it to safetensors first, e.g. load it with transformers and save_pretrained()"
        )
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in tensors:
                    raise ValueError(f"{src}: tensor {key} is stored twice ({tensors[key].file.name} and {file.name})")
                view = f.get_slice(key)
                tensors[key] = SourceTensor(file, tuple(view.get_shape()), view.get_dtype())
    if weight_map is not None and set(weight_map) != set(tensors):
        diff = sorted(set(weight_map) ^ set(tensors))[:10]
        raise ValueError(f"{src}: model.safetensors.index.json and the shard files disagree on {diff}")
    return tensors


def map_source_keys(source_keys, src) -> dict[str, str]:
    """VISOR checkpoint key -> source key, through `KEY_MAP`. Raises on keys it cannot place or places twice."""
    mapped, unplaced = {}, []
    for key in source_keys:
        for pattern, replacement in KEY_MAP:
            if re.match(pattern, key):
                target = re.sub(pattern, replacement, key)
                if target in mapped:
                    raise ValueError(f"{src}: {mapped[target]} and {key} are the same weight ({target}) in two layouts")
                mapped[target] = key
                break
        else:
            unplaced.append(key)
    if unplaced:
        raise ValueError(f"{src}: {len(unplaced)} unexpected keys that are not LLaVA-OneVision weights: {unplaced[:10]}")
    return mapped


# --------------------------------------------------------------------------------------------------
# Tokenizer with the routing token
# --------------------------------------------------------------------------------------------------


def routing_token_id(src_dir: Path, image_token_id: int, src) -> int:
    """The id the routing token gets in the source's tokenizer: the next free one (`len(tokenizer)`)."""
    from transformers import AutoTokenizer

    if not (src_dir / "tokenizer_config.json").is_file():
        raise ValueError(f"{src} has no tokenizer (tokenizer_config.json); the processor needs one")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir)
    except (ValueError, OSError) as error:
        raise ValueError(
            f"{src}: its tokenizer does not load with this transformers ({error}). Tokenizer files written by "
            "transformers 5.x do not load in 4.57: convert such a checkpoint with 5.x"
        ) from error
    if ROUTING_TOKEN in tokenizer.get_vocab():
        raise ValueError(f"{src}: the tokenizer already holds {ROUTING_TOKEN}; is it already a VISOR checkpoint?")
    found_image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if found_image_id != image_token_id:
        raise ValueError(
            f"{src}: the tokenizer maps {IMAGE_TOKEN} to {found_image_id}, config.json's image_token_index is {image_token_id}"
        )
    return len(tokenizer)


def write_tokenizer_files(src_dir: Path, dst_dir: Path, token_id: int) -> None:
    """Carry the tokenizer files as they are, with the routing token added as a special token at `token_id`.

    The files are edited as JSON rather than re-saved, so they keep the source's format (tokenizer files written by
    5.x do not load in 4.57).
    """
    from transformers import AutoTokenizer

    present = [name for name in TOKENIZER_FILES if (src_dir / name).is_file()]
    for name in present:
        shutil.copyfile(src_dir / name, dst_dir / name)
    entry = {"content": ROUTING_TOKEN, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
             "special": True}
    edits = {
        "tokenizer.json": lambda d: d["added_tokens"].append({"id": token_id, **entry}),
        "tokenizer_config.json": lambda d: _edit_tokenizer_config(d, token_id, entry),
        "special_tokens_map.json": lambda d: d.get("additional_special_tokens", []).append(ROUTING_TOKEN),
        "added_tokens.json": lambda d: d.__setitem__(ROUTING_TOKEN, token_id),
    }
    for name, edit in edits.items():
        if name in present:
            data = json.loads((dst_dir / name).read_text(encoding="utf-8"))
            edit(data)
            (dst_dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(dst_dir).encode(ROUTING_TOKEN, add_special_tokens=False)
    if ids != [token_id]:
        raise RuntimeError(f"the routing token should encode as [{token_id}] after adding it, it encodes as {ids}")


def _edit_tokenizer_config(data: dict, token_id: int, entry: dict) -> None:
    data.setdefault("added_tokens_decoder", {})[str(token_id)] = entry
    for field in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(data.get(field), list):
            data[field].append(ROUTING_TOKEN)
    if "processor_class" in data:
        data["processor_class"] = "VisorProcessor"


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def expected_weights(config: VisorConfig) -> dict[str, tuple[int, ...]]:
    """VISOR checkpoint key -> shape, from the model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = VisorForConditionalGeneration(config)
    shapes = {VisorPreTrainedModel.checkpoint_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def new_parameter_rule(key: str) -> str:
    for pattern, rule in NEW_PARAMETERS:
        if re.match(pattern, key):
            return re.sub(pattern, rule, key) if rule.startswith("copy:") else rule
    raise ValueError(f"{key}: a VISOR weight with no initialisation rule in NEW_PARAMETERS")


class WeightReader:
    """Reads source tensors one at a time, each from a freshly opened file, so nothing stays mapped."""

    def __init__(self, source: dict[str, SourceTensor], mapped: dict[str, str], dtype: torch.dtype):
        self.source, self.mapped, self.dtype = source, mapped, dtype

    def read(self, visor_key: str) -> torch.Tensor:
        key = self.mapped[visor_key]
        with safe_open(self.source[key].file, framework="pt") as f:
            tensor = f.get_tensor(key)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor


def build_tensor(key, shape, reader: WeightReader, config: VisorConfig, routing: dict, generator) -> torch.Tensor:
    """The output tensor of one VISOR key."""
    if key.startswith(NEW_PREFIXES):
        rule = new_parameter_rule(key)
        if rule.startswith("copy:"):
            return reader.read(rule.removeprefix("copy:")).clone()
        if rule == "zeros":
            return torch.zeros(shape, dtype=reader.dtype)
        if rule == "ones":
            return torch.ones(shape, dtype=reader.dtype)
        std = config.text_config.initializer_range
        return torch.normal(0.0, std, shape, generator=generator).to(reader.dtype)
    tensor = reader.read(key)
    if key in EMBEDDING_KEYS:  # the routing token's row: mean of the rows the tokenizer uses
        rows = tensor[: min(routing["num_tokens"], tensor.shape[0])]
        mean = rows.float().mean(0).to(tensor.dtype)
        if shape[0] > tensor.shape[0]:
            tensor = torch.cat([tensor, tensor.new_zeros(shape[0] - tensor.shape[0], tensor.shape[1])])
        tensor[routing["token_id"]] = mean
    return tensor.contiguous()


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, max_shard_size: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + ([current] if current else [])


def write_weights(dst_dir: Path, shapes, reader, config, routing, max_shard_size: int, progress: bool, seed: int = 0):
    """Write the weights shard by shard; only the shard being written is in memory."""
    shards = plan_shards(shapes, torch.tensor([], dtype=reader.dtype).element_size(), max_shard_size)
    names = (
        ["model.safetensors"] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    generator = torch.Generator().manual_seed(seed)
    weight_map, total_size = {}, 0
    with tqdm(total=len(shapes), desc="Writing VISOR weights", unit="tensor", disable=not progress) as bar:
        for name, keys in zip(names, shards):
            shard = {}
            for key in keys:
                shard[key] = build_tensor(key, shapes[key], reader, config, routing, generator)
                total_size += shard[key].numel() * shard[key].element_size()
                weight_map[key] = name
                bar.update()
            save_file(shard, dst_dir / name, metadata={"format": "pt"})
            del shard
    if len(names) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (dst_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def convert(
    src,
    dst,
    cross_attn_layers=None,
    self_attn_layers=None,
    configurations=None,
    dtype=None,
    push_to_hub: str | None = None,
    private: bool = False,
    max_shard_size="2GB",
    progress: bool = True,
) -> Path:
    """Convert the LLaVA-OneVision checkpoint `src` (Hub id or folder) into a VISOR folder `dst`.

    Args:
        cross_attn_layers, self_attn_layers: lists of layer indices, "2,5,8" strings, or "all"; default L/3 each,
            spread uniformly (`VisorConfig.default_layers`).
        configurations: the viable subsets of `self_attn_layers` (default: one evenly spread subset per size).
        dtype: "float32", "bfloat16" or "float16"; default the source's dtype.
        push_to_hub: a repo id: upload the folder there in one commit (`private` for a new repo).
        max_shard_size: bytes or "2GB"-like; peak memory is about one shard.
    Returns the output folder.
    """
    out_dtype = parse_dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size)
    src_dir = resolve_source(src)
    dst_dir = Path(dst)
    if dst_dir.resolve() == src_dir.resolve():
        raise ValueError("--dst must differ from --src")
    llava_json = read_llava_config(src_dir, src)
    source = index_source_weights(src_dir, src)
    mapped = map_source_keys(source, src)

    from transformers import LlavaOnevisionConfig

    # A source written by 5.x carries only `rope_parameters`, which 4.57 would read as rope_theta=10000.
    VisorPreTrainedModel.portable_text_config(llava_json)
    llava_config = LlavaOnevisionConfig.from_dict(dict(llava_json))
    num_layers = llava_config.text_config.num_hidden_layers
    tied = bool(llava_config.tie_word_embeddings or getattr(llava_config.text_config, "tie_word_embeddings", False))
    if tied:
        mapped.pop("lm_head.weight", None)  # some checkpoints store the tied head anyway
    token_id = routing_token_id(src_dir, llava_config.image_token_id, src)

    config = VisorConfig.from_llava_onevision_config(
        llava_config,
        cross_attn_layers=parse_layers(cross_attn_layers, num_layers, "cross_attn_layers"),
        self_attn_layers=parse_layers(self_attn_layers, num_layers, "self_attn_layers"),
        configurations=configurations, routing_token_id=token_id, tie_word_embeddings=tied,
    )
    source_vocab = config.text_config.vocab_size
    if token_id >= source_vocab:  # no spare row: grow the embedding (and an untied lm_head) by one row
        config.text_config.vocab_size = token_id + 1
    source_dtypes = Counter(t.dtype for t in source.values() if t.dtype in ("F32", "BF16", "F16"))
    source_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[source_dtypes.most_common(1)[0][0]]
    out_dtype = out_dtype or source_dtype
    config.dtype = str(out_dtype).removeprefix("torch.")

    # Checks: every LLaVA-OneVision weight present, nothing else, every shape as expected.
    shapes = expected_weights(config)
    base = {k: s for k, s in shapes.items() if not k.startswith(NEW_PREFIXES)}
    missing = sorted(set(base) - set(mapped))
    unexpected = sorted(mapped[k] for k in set(mapped) - set(base))
    if missing or unexpected:
        raise ValueError(
            f"{src}: the weights do not match LLaVA-OneVision with this config.json "
            f"({len(mapped)} weights, {len(base)} expected). Missing: {missing[:10]}; unexpected: {unexpected[:10]}"
        )
    for key, shape in base.items():
        expected = (source_vocab, *shape[1:]) if key in EMBEDDING_KEYS else shape
        if source[mapped[key]].shape != expected:
            raise ValueError(
                f"{src}: {mapped[key]} has shape {source[mapped[key]].shape}, config.json implies {expected}"
            )
    for key in shapes:
        if key.startswith(NEW_PREFIXES):
            rule = new_parameter_rule(key)
            if rule.startswith("copy:") and shapes[rule.removeprefix("copy:")] != shapes[key]:
                raise ValueError(f"{key} starts as a copy of {rule[5:]}, whose shape {shapes[rule[5:]]} differs")

    dst_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(src_dir, dst_dir, token_id)
    reader = WeightReader(source, mapped, out_dtype)
    routing = {"token_id": token_id, "num_tokens": token_id}  # the rows before the routing token are the tokenizer's
    write_weights(dst_dir, shapes, reader, config, routing, max_shard_bytes, progress)
    config.save_pretrained(dst_dir)
    VisorPreTrainedModel.make_config_portable(dst_dir)
    write_other_files(src_dir, dst_dir, src, config, llava_json, push_to_hub)
    check_written_weights(dst_dir, shapes)
    check_processor(dst_dir, config)
    if push_to_hub:
        upload(dst_dir, push_to_hub, private, src)
    return dst_dir


def write_other_files(src_dir: Path, dst_dir: Path, src, config: VisorConfig, llava_json: dict, repo_id) -> None:
    from transformers import GenerationConfig

    package_dir = Path(__file__).parent
    for name in CODE_FILES:
        shutil.copyfile(package_dir / name, dst_dir / name)
    if (src_dir / "generation_config.json").is_file():
        shutil.copyfile(src_dir / "generation_config.json", dst_dir / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(dst_dir)

    # Image processor: the source's preprocessor_config.json (or the nested one of a 5.x processor_config.json).
    image_config = None
    if (src_dir / "preprocessor_config.json").is_file():
        image_config = json.loads((src_dir / "preprocessor_config.json").read_text())
    elif (src_dir / "processor_config.json").is_file():
        image_config = json.loads((src_dir / "processor_config.json").read_text()).get("image_processor")
    if not image_config:
        raise ValueError(f"{src} has no image processor config (preprocessor_config.json)")
    image_config["processor_class"] = "VisorProcessor"
    _write_json(dst_dir / "preprocessor_config.json", image_config)

    vision = config.vision_config
    _write_json(dst_dir / "processor_config.json", {
        "processor_class": "VisorProcessor",
        "auto_map": {"AutoProcessor": "processing_visor.VisorProcessor"},
        "image_token": IMAGE_TOKEN,
        "routing_token": ROUTING_TOKEN,
        "num_image_tokens": (vision.image_size // vision.patch_size) ** 2,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision_aspect_ratio": config.vision_aspect_ratio,
    })
    (dst_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")

    for license_file in src_dir.glob("LICENSE*"):
        shutil.copyfile(license_file, dst_dir / license_file.name)
    readme = src_dir / "README.md"
    license = source_license(readme.read_text(encoding="utf-8") if readme.is_file() else None)
    on_hub = not Path(src).is_dir()
    base_model = str(src) if on_hub else llava_json.get("_name_or_path") or Path(src).name
    card = model_card(config, base_model=base_model, license=license, repo_id=repo_id, base_on_hub=on_hub)
    (dst_dir / "README.md").write_text(card, encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_written_weights(dst_dir: Path, shapes) -> None:
    """Read back the headers: exactly the expected keys, each with its shape."""
    found = {}
    for file in dst_dir.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            found.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    if found != shapes:
        diff = sorted(set(found.items()) ^ set(shapes.items()))[:10]
        raise RuntimeError(f"the written weights differ from the expected ones: {diff}")


def check_processor(dst_dir: Path, config: VisorConfig) -> None:
    processor = VisorProcessor.from_pretrained(dst_dir)
    if (processor.routing_token_id, processor.image_token_id) != (config.routing_token_id, config.image_token_id):
        raise RuntimeError(
            f"processor token ids (routing {processor.routing_token_id}, image {processor.image_token_id}) differ "
            f"from config.json's ({config.routing_token_id}, {config.image_token_id})"
        )


def upload(dst_dir: Path, repo_id: str, private: bool, src) -> None:
    """Model, processor, code and card in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    files = sorted(p for p in dst_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(dst_dir).as_posix(), path_or_fileobj=str(p)) for p in files]
    api.create_commit(repo_id=repo_id, operations=operations, commit_message=f"VISOR conversion of {src}")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m visor_hf.convert_llava_ov",
        description="Convert a LLaVA-OneVision checkpoint into a VISOR checkpoint that loads with "
        "trust_remote_code=True on transformers 4.57 and 5.x (weights, config, code, processor, model card).",
    )
    parser.add_argument("--src", required=True, help="Hub id (e.g. llava-hf/llava-onevision-qwen2-0.5b-ov-hf, "
                        "downloaded and cached by huggingface_hub) or local folder of a LLaVA-OneVision checkpoint "
                        "(safetensors only).")
    parser.add_argument("--dst", required=True, help="Output folder (created if needed).")
    layers_help = ("Comma-separated language-model layer indices (e.g. 2,5,8), or 'all'. Default: L/3 layers "
                   "spread uniformly over the L layers")
    parser.add_argument("--cross-attn-layers", metavar="LAYERS", help=f"Layers followed by a gated cross-attention from text to visual "
                        f"tokens. {layers_help}, ending at the last layer (2,5,...,23 for L=24).")
    parser.add_argument("--self-attn-layers", metavar="LAYERS", help=f"Layers that may also run self-attention on the visual tokens; "
                        f"budgets choose among them. {layers_help} (1,4,...,22 for L=24). Use 'all' to get "
                        "LLaVA-OneVision's exact outputs at budget='full'.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="Data type of the written weights. Default: the "
                        "source's.")
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE", help="Largest weight file (default 2GB); peak memory "
                        "of the conversion is about one shard.")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Also upload the folder to this Hub repo "
                        "(created if needed) in one commit.")
    parser.add_argument("--private", action="store_true", help="With --push-to-hub: create the repo private.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private needs --push-to-hub")
    try:
        dst = convert(
            args.src, args.dst, cross_attn_layers=args.cross_attn_layers, self_attn_layers=args.self_attn_layers,
            dtype=args.dtype, push_to_hub=args.push_to_hub, private=args.private,
            max_shard_size=args.max_shard_size, progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        parser.exit(1, f"error: {error}\n")
    print(f"VISOR checkpoint written to {dst}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
