"""Convert a LLaVA-OneVision checkpoint (Hub id or folder) into a VISOR checkpoint that anyone loads with
`trust_remote_code=True`, on transformers 4.57 and 5.x.

    python -m visor_hf.convert_llava_ov --src llava-hf/llava-onevision-qwen2-0.5b-ov-hf --dst ./visor-ov-0.5b
    convert("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "./visor-ov-0.5b", dtype="bfloat16")

Design choices:
- Declarative. `KEY_MAP` renames each source key to its VISOR checkpoint key; it covers the layouts checkpoints come
  in: transformers 4.x on disk (`language_model.model.*`, `language_model.lm_head`, `vision_tower.vision_model.*`,
  `multi_modal_projector.*`, `image_newline`), 5.x on disk (SigLIP without `vision_model.`) and the `model.*` names
  of 4.52+/5.x in memory. The expected keys, shapes and dtypes are those of `VisorForConditionalGeneration` built on
  the meta device; a missing, unexpected or doubled key, a shape mismatch, a non-floating weight or an unreadable
  source file is an error naming it, before anything is written.
- The model owns what is new. `VisorPreTrainedModel.new_parameters()` names VISOR's new parameters and
  `init_new_parameters(base_weight)` is their one initialisation (identity: gates and CPE at zero, norms at one,
  cross-attention projections copied from the same layer's self-attention, read here from the source checkpoint,
  router MLP normal(0, initializer_range), seeded so that a conversion is reproducible). Only the new modules of
  the meta model are materialised for it. The routing token's embedding row is the converter's own job (below).
- Streaming. Keys and shapes come from the safetensors headers; tensors are read one at a time (`safe_open`) into
  the output shard being written and released with it, so peak memory stays near one shard (`--max-shard-size`,
  plus VISOR's new parameters), well under a copy of the weights. Every tensor read is checked to be finite.
  Pickle `.bin` checkpoints are refused: unpickling can run code.
- Nothing lost, nothing half-written. The folder is written into a temporary sibling of `--dst` (same filesystem),
  verified completely (every key and shape, the index, the folder loads with `from_pretrained` on the meta device,
  the processor loads with the right token ids), then moved into place by a rename. A non-empty `--dst` is refused
  unless `--overwrite`; then the old folder and the new one swap places in one atomic `renameat2(RENAME_EXCHANGE)`
  (Linux) and the old one is deleted afterwards. Killed at any moment, `--dst` is the old folder intact or the new
  one complete, never a mix, and never holds stale weight files. (Where the atomic exchange is unavailable, the old
  folder is renamed aside first: a kill between the two renames leaves no `--dst`, with the old folder intact beside
  it.) Leftovers of a killed conversion are hidden siblings `.<dst name>.converting-<pid>-*`, removed by the next
  conversion to the same `--dst`.
- On-disk layout: 4.57's (`VisorPreTrainedModel.checkpoint_key`, SigLIP under `vision_tower.vision_model.`), which
  both lines load with zero missing keys; `lm_head.weight` is not written when the embeddings are tied.
- Routing token `<|visor_route|>`: added to the tokenizer as a special token at the next free id by editing the
  source's tokenizer files (they are carried as they are, so 4.57 and 5.x both read them), and
  `config.routing_token_id` set. Its embedding row (and lm_head row when untied) starts at the mean of the rows the
  tokenizer uses; the embedding grows by one row only if that id is past the vocabulary (Qwen2 has spare rows).
- Output folder: weights (+ index when sharded), `config.json` (full `auto_map`, RoPE fields of both lines),
  `generation_config.json`, the three Hub code files, processor files (tokenizer files, `preprocessor_config.json`,
  `processor_config.json`, `chat_template.jinja`), LICENSE files, and a model card. `--push-to-hub` uploads the
  folder in one commit, once it is in place.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .configuration_visor import HUB_CODE_FILES, VisorConfig
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

EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors dtype names of floating-point tensors: what a LLaVA-OneVision weight may be stored as
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model",
)
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
        with open_safetensors(file) as f:
            for key in f.keys():
                if key in tensors:
                    raise ValueError(f"{src}: tensor {key} is stored twice ({tensors[key].file.name} and {file.name})")
                view = f.get_slice(key)
                tensors[key] = SourceTensor(file, tuple(view.get_shape()), view.get_dtype())
    if weight_map is not None and set(weight_map) != set(tensors):
        diff = sorted(set(weight_map) ^ set(tensors))[:10]
        raise ValueError(f"{src}: model.safetensors.index.json and the shard files disagree on {diff}")
    return tensors


def open_safetensors(file: Path):
    """`safe_open(file)`, with an error that names the file when it is truncated or not safetensors at all (the
    library's own message, e.g. "incomplete metadata, file not fully covered", does not)."""
    try:
        return safe_open(file, framework="pt")
    except Exception as error:  # safetensors raises its own SafetensorError (an Exception) or OSError
        raise ValueError(
            f"{file}: not a readable safetensors file, truncated or corrupt? ({type(error).__name__}: {error}). "
            "Download or save it again"
        ) from error


def read_image_processor_config(src_dir: Path, src) -> dict:
    """The source's image processor settings: preprocessor_config.json, or the nested `image_processor` of a 5.x
    processor_config.json. Read before anything is written: a source without them cannot give a VISOR folder."""
    for name, field in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = src_dir / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as error:
                raise ValueError(f"{path}: not valid JSON ({error})") from error
            data = data.get(field) if field else data
            if data:
                return data
    raise ValueError(
        f"{src} has no image processor config: expected preprocessor_config.json (or processor_config.json with an "
        "'image_processor' entry) next to config.json; the VISOR processor needs it"
    )


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
# Destination: refuse to clobber, write beside, swap in atomically
# --------------------------------------------------------------------------------------------------

STAGING_MARK = ".converting-"  # hidden siblings `.<dst name>.converting-<pid>-<random>` of a conversion under way


def check_destination(dst_dir: Path, src_dir: Path, overwrite: bool) -> Path:
    """`dst_dir` made absolute. A file, a non-empty folder without `overwrite`, or a folder holding the source is
    refused, so a user's files are never touched by accident."""
    dst_dir = Path(os.path.abspath(dst_dir))
    if dst_dir.resolve() == src_dir.resolve():
        raise ValueError(f"--dst {dst_dir} is the source folder: write the VISOR checkpoint elsewhere")
    if src_dir.resolve().is_relative_to(dst_dir.resolve()):
        raise ValueError(f"--dst {dst_dir} contains the source {src_dir}: replacing it would delete the source")
    if dst_dir.exists() and not dst_dir.is_dir():
        raise ValueError(f"--dst {dst_dir} is a file, not a folder")
    if dst_dir.is_dir() and any(dst_dir.iterdir()) and not overwrite:
        names = sorted(p.name for p in dst_dir.iterdir())
        raise ValueError(
            f"--dst {dst_dir} is not empty ({len(names)} entries: {names[:5]}); choose an empty or new folder, or pass "
            "--overwrite (overwrite=True) to replace the whole folder with the new conversion"
        )
    return dst_dir


def staging_folder(dst_dir: Path) -> Path:
    """A new hidden folder beside `dst_dir` (same filesystem, so the final move is a rename), after removing the
    leftovers of earlier conversions to the same folder that were killed (their process is gone)."""
    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dst_dir.name}{STAGING_MARK}"
    for leftover in dst_dir.parent.iterdir():
        pid = leftover.name.removeprefix(prefix).split("-")[0]
        if leftover.name.startswith(prefix) and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=dst_dir.parent))


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def publish(staging: Path, dst_dir: Path) -> None:
    """Move the complete, verified `staging` folder to `dst_dir`, so that `dst_dir` is always either what it was or
    the new folder. An absent or empty `dst_dir` is replaced by one rename; a non-empty one (`--overwrite`) swaps
    places with `staging` in one atomic exchange, and the old folder, now at `staging`, is deleted after. The files
    are flushed to disk first, so that a power cut cannot leave the new name on missing data either."""
    sync_folder(staging)
    if not dst_dir.exists() or not any(dst_dir.iterdir()):
        os.replace(staging, dst_dir)  # rename(2) replaces an empty folder atomically
        return
    if exchange_paths(staging, dst_dir):
        remove_folder(staging)  # the old folder
        return
    # No atomic exchange (not Linux, or a filesystem without it): old folder aside, then the new one in place.
    aside = Path(tempfile.mkdtemp(prefix=f".{dst_dir.name}{STAGING_MARK}{os.getpid()}-old-", dir=dst_dir.parent))
    os.replace(dst_dir, aside / dst_dir.name)
    try:
        os.replace(staging, dst_dir)
    except OSError:
        os.replace(aside / dst_dir.name, dst_dir)  # put the old folder back
        raise
    remove_folder(aside)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where that is unavailable."""
    rename_exchange, at_fdcwd = 2, -100
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28, or not Linux
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the kernel or filesystem cannot exchange
        return False
    raise OSError(error, f"cannot swap {a} and {b}: {os.strerror(error)}")


def sync_folder(folder: Path) -> None:
    """fsync every file of `folder` and the folder itself (where the platform allows opening a folder)."""
    for path in [*folder.iterdir(), folder]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # e.g. folders on Windows
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def meta_model(config: VisorConfig) -> VisorForConditionalGeneration:
    """The VISOR model on the meta device: the expected keys, shapes and dtypes, and the owner of what is new."""
    with torch.device("meta"):
        return VisorForConditionalGeneration(config)


def expected_weights(model: VisorForConditionalGeneration) -> dict[str, tuple[int, ...]]:
    """VISOR checkpoint key -> shape (a tied lm_head is not written)."""
    shapes = {VisorPreTrainedModel.checkpoint_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def new_weight_keys(model: VisorForConditionalGeneration) -> set[str]:
    """Checkpoint keys of VISOR's new parameters, as the model names them (`new_parameters()`)."""
    return {VisorPreTrainedModel.checkpoint_key(name) for name in model.new_parameters()}


class WeightReader:
    """Reads source tensors one at a time, each from a freshly opened file, so nothing stays mapped. Every tensor
    is checked to be finite: a NaN or inf in a pre-trained weight is corruption, not something to convert."""

    def __init__(self, source: dict[str, SourceTensor], mapped: dict[str, str], dtype: torch.dtype):
        self.source, self.mapped, self.dtype = source, mapped, dtype

    def read(self, visor_key: str) -> torch.Tensor:
        key = self.mapped[visor_key]
        file = self.source[key].file
        try:
            with safe_open(file, framework="pt") as f:
                tensor = f.get_tensor(key)
        except Exception as error:  # changed or truncated since its header was read
            raise ValueError(f"{file}: cannot read tensor {key} ({type(error).__name__}: {error})") from error
        if tensor.is_floating_point():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                count = int((~finite).sum())
                raise ValueError(
                    f"{file}: tensor {key} has {count} non-finite values (NaN or inf) of {tensor.numel()}; "
                    "the source checkpoint is corrupt"
                )
            tensor = tensor.to(self.dtype)
        return tensor


def check_source_dtypes(model, mapped: dict[str, str], source: dict[str, SourceTensor], src) -> None:
    """A weight that VISOR holds as floating point must be stored as floating point (not quantized or integer)."""
    dtypes = {VisorPreTrainedModel.checkpoint_key(k): v.dtype for k, v in model.state_dict().items()}
    for visor_key, key in mapped.items():
        stored = source[key].dtype
        if dtypes[visor_key].is_floating_point and stored not in FLOAT_DTYPES:
            raise ValueError(
                f"{src}: {source[key].file.name} stores {key} as {stored}; it is a floating-point weight, allowed "
                f"dtypes are {sorted(FLOAT_DTYPES)} (quantized checkpoints cannot be converted)"
            )


def initial_new_weights(model: VisorForConditionalGeneration, reader: WeightReader, seed: int = 0) -> dict:
    """VISOR's new parameters as the model initialises them (`init_new_parameters`), the cross-attention projections
    copied from the source checkpoint's self-attention. Only the new modules of the meta model get memory."""
    for name in model.new_parameters():
        model.get_submodule(name.rpartition(".")[0]).to_empty(device="cpu", recurse=False)
    base_weight = lambda name: reader.read(VisorPreTrainedModel.checkpoint_key(name))  # noqa: E731
    with torch.random.fork_rng(devices=[]):  # reproducible conversions, and the caller's RNG left alone
        torch.manual_seed(seed)
        model.init_new_parameters(base_weight=base_weight)
    return {VisorPreTrainedModel.checkpoint_key(n): p.detach() for n, p in model.new_parameters().items()}


def build_tensor(key, shape, reader: WeightReader, new_weights: dict, routing: dict) -> torch.Tensor:
    """The output tensor of one VISOR key: a new parameter, or a source weight (+ the routing token's row)."""
    if key in new_weights:
        return new_weights[key].to(reader.dtype).contiguous()
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


def write_weights(dst_dir: Path, shapes, reader, new_weights, routing, max_shard_size: int, progress: bool):
    """Write the weights shard by shard; only the shard being written is in memory."""
    shards = plan_shards(shapes, torch.tensor([], dtype=reader.dtype).element_size(), max_shard_size)
    names = (
        ["model.safetensors"] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total_size = {}, 0
    with tqdm(total=len(shapes), desc="Writing VISOR weights", unit="tensor", disable=not progress) as bar:
        for name, keys in zip(names, shards):
            shard = {}
            for key in keys:
                shard[key] = build_tensor(key, shapes[key], reader, new_weights, routing)
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


@dataclass
class Plan:
    """Everything a conversion writes, decided and checked from the source before anything is written."""

    config: VisorConfig
    model: VisorForConditionalGeneration  # on the meta device, but for the new modules once initialised
    shapes: dict[str, tuple[int, ...]]
    reader: WeightReader
    token_id: int
    llava_json: dict
    image_config: dict


def plan_conversion(src_dir: Path, src, cross_attn_layers, self_attn_layers, configurations, dtype) -> Plan:
    """Read and check the source (config, tokenizer, image processor, every weight's key, shape and dtype)."""
    from transformers import LlavaOnevisionConfig

    llava_json = read_llava_config(src_dir, src)
    source = index_source_weights(src_dir, src)
    mapped = map_source_keys(source, src)
    image_config = read_image_processor_config(src_dir, src)

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
    stored = Counter(t.dtype for t in source.values() if t.dtype in ("F32", "BF16", "F16"))
    out_dtype = dtype or (FLOAT_DTYPES[stored.most_common(1)[0][0]] if stored else torch.float32)
    config.dtype = str(out_dtype).removeprefix("torch.")

    model = meta_model(config)
    shapes = expected_weights(model)
    check_source_weights(shapes, new_weight_keys(model), mapped, source, source_vocab, src)
    check_source_dtypes(model, mapped, source, src)
    return Plan(config, model, shapes, WeightReader(source, mapped, out_dtype), token_id, llava_json, image_config)


def check_source_weights(shapes, new_keys, mapped, source, source_vocab: int, src) -> None:
    """Every LLaVA-OneVision weight present, nothing else, every shape as expected."""
    base = {k: s for k, s in shapes.items() if k not in new_keys}
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
    overwrite: bool = False,
) -> Path:
    """Convert the LLaVA-OneVision checkpoint `src` (Hub id or folder) into a VISOR folder `dst`.

    Args:
        cross_attn_layers, self_attn_layers: lists of layer indices, "2,5,8" strings, or "all"; default L/3 each,
            spread uniformly (`VisorConfig.default_layers`).
        configurations: the viable subsets of `self_attn_layers` (default: one evenly spread subset per size).
        dtype: "float32", "bfloat16" or "float16"; default the source's dtype.
        push_to_hub: a repo id: upload the folder there in one commit (`private` for a new repo).
        max_shard_size: bytes or "2GB"-like; peak memory is about one shard.
        overwrite: replace a non-empty `dst` (refused otherwise). The old folder stays whole until the new one,
            complete and verified, takes its place in one atomic move; then it is deleted.
    Returns the output folder.
    """
    out_dtype = parse_dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size)
    src_dir = resolve_source(src)
    dst_dir = check_destination(Path(dst), src_dir, overwrite)
    plan = plan_conversion(src_dir, src, cross_attn_layers, self_attn_layers, configurations, out_dtype)

    staging = staging_folder(dst_dir)
    try:
        write_folder(plan, staging, src_dir, src, push_to_hub, max_shard_bytes, progress)
        verify_folder(staging, plan.shapes, plan.config)
        publish(staging, dst_dir)
    finally:
        if staging.exists():  # an error above: the partial folder goes, `dst` is as it was
            remove_folder(staging)
    if push_to_hub:
        upload(dst_dir, push_to_hub, private, src)
    return dst_dir


def write_folder(plan: Plan, folder: Path, src_dir: Path, src, repo_id, max_shard_bytes: int, progress: bool) -> None:
    """Tokenizer, weights, config, code, processor and model card of `plan` into the (empty) `folder`."""
    write_tokenizer_files(src_dir, folder, plan.token_id)
    new_weights = initial_new_weights(plan.model, plan.reader)
    routing = {"token_id": plan.token_id, "num_tokens": plan.token_id}  # the rows before it are the tokenizer's
    write_weights(folder, plan.shapes, plan.reader, new_weights, routing, max_shard_bytes, progress)
    plan.config.save_pretrained(folder)
    VisorPreTrainedModel.make_config_portable(folder)
    write_other_files(src_dir, folder, src, plan, repo_id)


def write_other_files(src_dir: Path, dst_dir: Path, src, plan: Plan, repo_id) -> None:
    from transformers import GenerationConfig

    config = plan.config
    package_dir = Path(__file__).parent
    for name in HUB_CODE_FILES:
        shutil.copyfile(package_dir / name, dst_dir / name)
    if (src_dir / "generation_config.json").is_file():
        shutil.copyfile(src_dir / "generation_config.json", dst_dir / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(dst_dir)

    _write_json(dst_dir / "preprocessor_config.json", {**plan.image_config, "processor_class": "VisorProcessor"})
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
    base_model = str(src) if on_hub else plan.llava_json.get("_name_or_path") or Path(src).name
    card = model_card(config, base_model=base_model, license=license, repo_id=repo_id, base_on_hub=on_hub)
    (dst_dir / "README.md").write_text(card, encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Verification of the written folder (before it takes the place of `dst`)
# --------------------------------------------------------------------------------------------------


def verify_folder(folder: Path, shapes, config: VisorConfig) -> None:
    """Every key and shape, the index, the model loading (on the meta device: no memory) and the processor."""
    from transformers.utils import logging as hf_logging

    check_written_weights(folder, shapes)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # 5.x shows a "Loading weights" bar; this load is only a check
    try:
        _, info = VisorForConditionalGeneration.from_pretrained(folder, device_map="meta", output_loading_info=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise RuntimeError(f"the written folder does not load cleanly: {problems}")
    check_processor(folder, config)


def check_written_weights(dst_dir: Path, shapes) -> None:
    """Read back the headers: exactly the expected keys, each with its shape, and an index that names them all."""
    found, files = {}, {}
    for file in dst_dir.glob("*.safetensors"):
        with open_safetensors(file) as f:
            for key in f.keys():
                found[key], files[key] = tuple(f.get_slice(key).get_shape()), file.name
    if found != shapes:
        diff = sorted(set(found.items()) ^ set(shapes.items()))[:10]
        raise RuntimeError(f"the written weights differ from the expected ones: {diff}")
    index = dst_dir / "model.safetensors.index.json"
    if len(set(files.values())) > 1 or index.exists():
        weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else {}
        if weight_map != files:
            raise RuntimeError(f"{index.name} does not name every written weight and its file")


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
    parser.add_argument("--dst", required=True, help="Output folder: new or empty (created if needed), written "
                        "only once complete and verified.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --dst entirely: the old folder "
                        "stays whole until the new one takes its place in one move, then it is deleted.")
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
            max_shard_size=args.max_shard_size, progress=not args.no_progress, overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, OSError) as error:
        parser.exit(1, f"error: {error}\n")
    print(f"VISOR checkpoint written to {dst}" + (f" and pushed to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
