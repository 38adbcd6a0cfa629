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

IMAGE_TOKEN_ID = 250
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
    """Visual tokens LLaVA-OneVision makes from one image of `image_size` (H, W), computed by the model."""
    config = model.config
    patches = image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    pixel_values = torch.zeros(1, patches, 3, config.vision_config.image_size, config.vision_config.image_size)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values, torch.tensor([image_size]))
    features = getattr(out, "pooler_output", out)
    return features[0].shape[0]


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
