"""Multimodal processing of VISOR prompts for vLLM's encoder-decoder path.

A prompt `... <image>\\n question ...` becomes two prompts:
- the decoder prompt: the text tokens, with every `<image>` placeholder stripped (the text layers' KV cache then
  holds text only);
- the encoder prompt: one placeholder token per visual token, image after image. Its length (the encoder length)
  is what vLLM sizes each request's cross-attention caches by, so it equals `visor_hf`'s visual-token count
  (`configuration_visor.num_visual_tokens`: anyres base crop + unpadded grid + newlines, or base crop + one newline
  for an image of a multi-image prompt).

Each image item carries, besides its pixels (LLaVA-OneVision's PIL image processor, all anyres crops) and size,
`text_offset`: how many decoder tokens precede it. The model turns these into LLaVA-OneVision's dense RoPE
positions (`VisorForConditionalGeneration.get_mrope_input_positions`) and into the image-causal cross-attention
mask (text before an image does not read it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import cached_property

import torch
from transformers import BatchFeature

from visor_hf.configuration_visor import num_visual_tokens
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseProcessingInfo,
    EncDecMultiModalProcessor,
    PromptReplacement,
    PromptUpdate,
)

TEXT_OFFSETS_KWARG = "visor_text_offsets"  # how `apply` hands the images' text offsets to `_call_hf_processor`
MULTI_IMAGE_KWARG = "visor_multi_image"


class VisorProcessingInfo(BaseProcessingInfo):
    """What the processor needs to know about a VISOR checkpoint: its config, image processor and token counts."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    @cached_property
    def image_processor(self):
        """LLaVA-OneVision's PIL image processor, as `visor_hf.processing_visor` uses it (no torchvision needed)."""
        from visor_hf.processing_visor import IMAGE_PROCESSOR_CLASS
        import transformers

        return getattr(transformers, IMAGE_PROCESSOR_CLASS).from_pretrained(self.ctx.model_config.model)

    @property
    def image_token_id(self) -> int:
        return self.get_hf_config().image_token_index

    def num_image_tokens(self, width: int, height: int, multi_image: bool) -> int:
        """Visual tokens of one image: `visor_hf`'s one count."""
        return num_visual_tokens(self.get_hf_config(), (height, width), multi_image=multi_image)

    def largest_image_size(self) -> tuple[int, int]:
        """(width, height) of the largest anyres pinpoint: the image with the most visual tokens."""
        height, width = max(self.get_hf_config().image_grid_pinpoints, key=lambda hw: hw[0] * hw[1])
        return width, height

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        width, height = self.largest_image_size()
        return {"image": self.num_image_tokens(width, height, multi_image=False)}


class VisorDummyInputsBuilder(BaseDummyInputsBuilder[VisorProcessingInfo]):
    """Profiling inputs: one `<image>` per image, each of the largest pinpoint's size."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<image>" * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        width, height = self.info.largest_image_size()
        overrides = (mm_options or {}).get("image")
        images = self._get_dummy_images(width=width, height=height, num_images=mm_counts.get("image", 0), overrides=overrides)
        return {"image": images}


class VisorMultiModalProcessor(EncDecMultiModalProcessor[VisorProcessingInfo]):
    """Decoder prompt = text without image placeholders; encoder prompt = the visual tokens (see module docstring)."""

    skip_decoder_start_token = True  # the decoder prompt is the prompt's own text: nothing is prepended

    def apply(self, inputs, timing_ctx):
        """Note each image's text offset (decoder tokens before it) and whether the prompt has several images, from the
        full prompt, for `_call_hf_processor`, which only sees the encoder prompt."""
        positions = [i for i, token in enumerate(inputs.prompt) if token == self.info.image_token_id]
        extra = {TEXT_OFFSETS_KWARG: [p - k for k, p in enumerate(positions)], MULTI_IMAGE_KWARG: len(positions) > 1}
        inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, **extra})
        return super().apply(inputs, timing_ctx)

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        """One placeholder per image; `_get_prompt_updates` expands each to the image's visual tokens."""
        return [self.info.image_token_id] * mm_items.get_count("image", strict=False)

    def create_decoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        """The prompt's text tokens: the image placeholders go to the encoder."""
        return [token for token in prompt if token != self.info.image_token_id]

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Per image: its anyres crops (num_crops, 3, H, W), its size (H, W), its text offset and the multi-image flag."""
        images = hf_data.get("images") or []
        offsets = list(hf_kwargs.get(TEXT_OFFSETS_KWARG) or [0] * len(images))
        if len(offsets) != len(images):
            raise ValueError(f"the prompt holds {len(offsets)} <image> placeholders for {len(images)} images")
        multi_image = bool(hf_kwargs.get(MULTI_IMAGE_KWARG, len(images) > 1))
        pixel_values, image_sizes = [], []
        for image in images:
            out = self.info.image_processor(image, return_tensors="pt")
            pixel_values.append(out["pixel_values"][0])
            image_sizes.append(out["image_sizes"][0])
        return BatchFeature({
            "pixel_values": pixel_values,
            "image_sizes": torch.stack(image_sizes) if images else torch.zeros(0, 2, dtype=torch.long),
            "text_offset": torch.tensor(offsets, dtype=torch.long),
            "multi_image": torch.full((len(images),), multi_image, dtype=torch.bool),
        })

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {name: MultiModalFieldConfig.batched("image") for name in ("pixel_values", "image_sizes", "text_offset", "multi_image")}

    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs, out_mm_kwargs: MultiModalKwargsItems
    ) -> Sequence[PromptUpdate]:
        if not mm_items.get_count("image", strict=False):
            return []
        images = mm_items.get_items("image", ImageProcessorItems)
        multi_image = images.get_count() > 1
        token = self.info.image_token_id

        def visual_tokens(item_idx: int) -> list[int]:
            size = images.get_image_size(item_idx)
            return [token] * self.info.num_image_tokens(size.width, size.height, multi_image)

        return [PromptReplacement(modality="image", target=[token], replacement=visual_tokens)]
