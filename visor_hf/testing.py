"""Tiny random LLaVA-OneVision models and inputs, built with transformers' own classes.

They stand in for real checkpoints where the Hub cannot be reached (tests, README snippets, CI).

Usage:
    llava = tiny_llava_onevision()
    inputs = tiny_inputs(llava.config, image_sizes=[(56, 112)], prompt_lengths=[(3, 4)])
"""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from .configuration_visor import num_visual_tokens

IMAGE_TOKEN_ID = 250
VIDEO_TOKEN_ID = 252  # above the ids tiny_inputs draws text from, like IMAGE_TOKEN_ID
PAD_TOKEN_ID = 0


def tiny_llava_onevision_config(num_layers: int = 6, attn_implementation: str = "sdpa", **text_overrides):
    """SigLIP with 56-px crops of 14-px patches (16 tokens a crop), a Qwen2 of `num_layers` layers."""
    text_config = dict(
        model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=PAD_TOKEN_ID, eos_token_id=1, bos_token_id=2,
    )
    text_config.update(text_overrides)
    vision_config = dict(
        model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, image_size=56, patch_size=14, vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]], vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=True,
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def tiny_llava_onevision(seed: int = 0, **config_kwargs) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    config = tiny_llava_onevision_config(**config_kwargs)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    return model


def num_image_tokens(model, image_size) -> int:
    """Visual tokens LLaVA-OneVision makes from one image of `image_size` (H, W) alone in its sample: the package's
    one count (`configuration_visor.num_visual_tokens`), for a model or a config. `tests/test_visual_token_count.py`
    checks that count against what transformers' model makes."""
    return num_visual_tokens(getattr(model, "config", model), image_size)


def tiny_inputs(model, image_sizes, prompt_lengths, seed: int = 0, left_pad: bool = True) -> dict:
    """A batch of LLaVA-OneVision inputs: sample i is `before` text tokens, its image, `after` text tokens.

    image_sizes: one (H, W) per sample (or None for a text-only sample); prompt_lengths: (before, after).
    """
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    crop = config.vision_config.image_size
    rows, pixels, sizes = [], [], []
    max_patches = max(
        image_size_to_num_patches(s, config.image_grid_pinpoints, crop) for s in image_sizes if s is not None
    ) if any(s is not None for s in image_sizes) else 0
    for size, (before, after) in zip(image_sizes, prompt_lengths):
        text = lambda n: torch.randint(3, IMAGE_TOKEN_ID, (n,), generator=generator)
        row = [text(before)]
        if size is not None:
            row.append(torch.full((num_image_tokens(model, size),), IMAGE_TOKEN_ID))
            patches = image_size_to_num_patches(size, config.image_grid_pinpoints, crop)
            values = torch.zeros(max_patches, 3, crop, crop)
            values[:patches] = torch.randn(patches, 3, crop, crop, generator=generator)
            pixels.append(values)
            sizes.append(list(size))
        row.append(text(after))
        rows.append(torch.cat(row))
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left_pad else slice(0, len(row))
        input_ids[i, span] = row
        attention_mask[i, span] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixels:
        inputs["pixel_values"] = torch.stack(pixels)
        inputs["image_sizes"] = torch.tensor(sizes)
    return inputs


# --------------------------------------------------------------------------------------------------
# Tokenizer, image processor and checkpoint folders of tiny models (conversion and processor tests)
# --------------------------------------------------------------------------------------------------

TINY_SPECIAL_TOKENS = {"<|endoftext|>": PAD_TOKEN_ID, "<|im_end|>": 1, "<|im_start|>": 2, "<unk>": 3}


def tiny_tokenizer(vocab_size: int = 256):
    """A character-level fast tokenizer built offline, laid out like the tiny models' vocabulary.

    Ids: 0 `<|endoftext|>` (pad), 1 `<|im_end|>` (eos), 2 `<|im_start|>`, 3 `<unk>`, then newline and printable
    ASCII, fillers, `<image>` at IMAGE_TOKEN_ID, `<video>` at VIDEO_TOKEN_ID and fillers up to `vocab_size` (all rows of
    the embedding used).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = dict(TINY_SPECIAL_TOKENS)
    for char in ["\n"] + [chr(c) for c in range(32, 127)]:
        vocab[char] = len(vocab)
    while len(vocab) < vocab_size:
        named = {IMAGE_TOKEN_ID: "<image>", VIDEO_TOKEN_ID: "<video>"}
        vocab[named.get(len(vocab), f"<|extra_{len(vocab)}|>")] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token a character
    backend.decoder = decoders.Fuse()
    specials = [*TINY_SPECIAL_TOKENS, "<image>"] + (["<video>"] if vocab_size > VIDEO_TOKEN_ID else [])
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        model_max_length=4096,
    )


def tiny_image_processor(config):
    """LLaVA-OneVision's PIL image processor for the tiny vision tower: crops of the config's image size, its pinpoints."""
    import transformers

    cls = getattr(transformers, "LlavaOnevisionImageProcessorPil", None) or transformers.LlavaOnevisionImageProcessor
    crop = config.vision_config.image_size
    return cls(
        size={"height": crop, "width": crop}, image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def tiny_processor(config):
    """A `VisorProcessor` for a tiny model; the routing token is added to the tokenizer at the next free id
    (`vocab_size`), as the converter does."""
    from .processing_visor import ROUTING_TOKEN, VisorProcessor

    tokenizer = tiny_tokenizer(config.text_config.vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": [ROUTING_TOKEN]})
    crop, patch = config.vision_config.image_size, config.vision_config.patch_size
    return VisorProcessor(
        image_processor=tiny_image_processor(config), tokenizer=tokenizer, num_image_tokens=(crop // patch) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )


# Key layouts in which LLaVA-OneVision checkpoints exist on disk, written from the in-memory state dict.
# "legacy": transformers 4.x (`language_model.model.*`, `vision_tower.vision_model.*`); "v5": the in-memory names of 5.x
# (`model.language_model.*`, SigLIP without `vision_model.`).
def llava_onevision_checkpoint_key(key: str, layout: str) -> str:
    key = key.replace("model.vision_tower.vision_model.", "model.vision_tower.")  # 5.x in-memory form first
    if layout == "v5":
        return key
    if layout != "legacy":
        raise ValueError(f"layout={layout!r}: use 'legacy' or 'v5'")
    for new, old in (
        ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    ):
        if key.startswith(new):
            return old + key[len(new):]
    raise ValueError(f"{key}: no legacy name")


def save_llava_onevision(model, directory, layout: str = "legacy", max_shard_size: int | None = None,
                         tokenizer=None, image_processor=None, license: str | None = "apache-2.0") -> None:
    """Write `model` (a transformers LLaVA-OneVision) as a Hub checkpoint folder in an explicit key `layout`.

    Sharded with a `model.safetensors.index.json` when `max_shard_size` (bytes) is given. Tokenizer and image processor
    files are written by the running transformers (default: the tiny ones); a README.md carries `license`.
    """
    import json
    import os

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    state_dict = {llava_onevision_checkpoint_key(k, layout): v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings or getattr(model.config.text_config, "tie_word_embeddings", False):
        state_dict.pop("language_model.lm_head.weight" if layout == "legacy" else "lm_head.weight", None)
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size or 2**40
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state_dict[name] for name in names}, os.path.join(directory, filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state_dict.values())},
                 "weight_map": split.tensor_to_filename}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    (tokenizer or tiny_tokenizer(model.config.text_config.vocab_size)).save_pretrained(directory)
    (image_processor or tiny_image_processor(model.config)).save_pretrained(directory)
    if license:
        with open(os.path.join(directory, "README.md"), "w") as f:
            f.write(f"---\nlicense: {license}\n---\n# A tiny random LLaVA-OneVision\n")
