"""Multimodal processing of VISOR prompts for vLLM's encoder-decoder path.

A prompt `... <image>\\n question ...` becomes two prompts:
- the decoder prompt: the text tokens, with every `<image>` placeholder stripped (the text layers' KV cache then
  holds text only);
- the encoder prompt: one placeholder token per visual token, image after image. Its length (the encoder length)
  is what vLLM sizes each request's cross-attention caches by, so it equals `visor_hf`'s visual-token count
  (`configuration_visor.num_visual_tokens`: anyres base crop + unpadded grid + newlines, or base crop + one newline
  for an image of a multi-image prompt), or with token reduction the tokens `visor_hf` keeps.

All images of a prompt are one multimodal item (`ImageGroupItems`): vLLM's encoder-decoder scheduler takes one encoder
input per request, at the start of the encoder prompt. The item carries, per image, its pixels (LLaVA-OneVision's PIL
image processor: all anyres crops, or the base crop for an image of a multi-image prompt), its size, its visual-token
count before and after token reduction and `text_offset`, how many decoder tokens precede it. The model turns the offsets into LLaVA-OneVision's dense
RoPE positions (`VisorForConditionalGeneration.get_mrope_input_positions`) and into the image-causal cross-attention
mask (text before an image does not read it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
import math
from functools import cached_property

import torch
from transformers import BatchFeature

from visor_hf.configuration_visor import num_visual_tokens
from visor_hf.modeling_visor import image_token_layout, reduction_segments
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems, ProcessorBatchItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseProcessingInfo,
    EncDecMultiModalProcessor,
    PromptReplacement,
    PromptUpdate,
)

TEXT_OFFSETS_KWARG = "visor_text_offsets"  # how `apply` hands the images' text offsets to `_call_hf_processor`
FIELDS = ("pixel_values", "num_crops", "image_sizes", "text_offset", "num_visual_tokens", "num_kept_tokens")


class ImageGroupItems(ProcessorBatchItems):
    """The images of one prompt as one item (see the module docstring). `get(0)` is the list of images."""

    def __init__(self, images: Sequence) -> None:
        super().__init__([list(images)], "image")

    def get(self, index: int) -> list:
        return [self._unwrap(image) for image in self.data[index]]

    def get_processor_data(self) -> Mapping[str, object]:
        return {"image_groups": self.get_all()}

    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each image of the prompt (PIL images or arrays, as vLLM reads them)."""
        images = ImageProcessorItems(self.get(0))
        return [tuple(images.get_image_size(i)) for i in range(images.get_count())]


class VisorProcessingInfo(BaseProcessingInfo):
    """What the processor needs to know about a VISOR checkpoint: its config, image processor and token counts."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # counted per image; the processor gathers a prompt's images into one item

    @cached_property
    def image_processor(self):
        """LLaVA-OneVision's PIL image processor, as `visor_hf.processing_visor` uses it (no torchvision needed)."""
        import transformers

        from visor_hf.processing_visor import IMAGE_PROCESSOR_CLASS

        return getattr(transformers, IMAGE_PROCESSOR_CLASS).from_pretrained(self.ctx.model_config.model)

    @property
    def image_token_id(self) -> int:
        return self.get_hf_config().image_token_index

    def num_image_tokens(self, width: int, height: int, multi_image: bool) -> int:
        """Visual tokens of one image: `visor_hf`'s one count."""
        return num_visual_tokens(self.get_hf_config(), (height, width), multi_image=multi_image)

    @property
    def token_reduction(self) -> dict | None:
        from .config import served_token_reduction

        return served_token_reduction(self.get_hf_config())

    def num_kept_tokens(self, sizes: list[tuple[int, int]]) -> list[int]:
        """Visual tokens each image of a prompt keeps after the deployment's token reduction, `sizes` (height, width):
        what `visor_hf`'s `reduce_image_tokens` keeps (newlines, then per segment ceil(n * keep_ratio) tokens, or
        ceil(n / k) packed groups). `visor_hf.flops.token_reduction_counts` counts the same for a single image; this
        also takes the images of a multi-image prompt."""
        config, setting = self.get_hf_config(), self.token_reduction
        multi_image = len(sizes) > 1
        if setting is None:
            return [self.num_image_tokens(w, h, multi_image) for h, w in sizes]
        layout = image_token_layout(config, sizes, [len(sizes)])
        counts = []
        for is_newline, _, base_length in layout:
            kept = int(is_newline.sum())
            for segment in reduction_segments(is_newline, base_length, setting["method"]):
                n = segment.numel()
                kept += -(-n // setting["pack_factor"]) if setting["method"] == "pack" else math.ceil(n * setting["keep_ratio"])
            counts.append(kept)
        return counts

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
        """Gather the prompt's images into one item (`group_images`) and note each image's text offset (decoder tokens
        before it), from the full prompt, for `_call_hf_processor`, which only sees the encoder prompt."""
        positions = [i for i, token in enumerate(inputs.prompt) if token == self.info.image_token_id]
        num_images = inputs.mm_data_items.get_count("image", strict=False)
        if len(positions) != num_images:
            raise ValueError(f"the prompt holds {len(positions)} <image> placeholders for {num_images} images; "
                             "give one placeholder per image")
        offsets = {TEXT_OFFSETS_KWARG: [p - k for k, p in enumerate(positions)]}
        inputs = dataclasses.replace(
            self.group_images(inputs), hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, **offsets}
        )
        return super().apply(inputs, timing_ctx)

    @staticmethod
    def group_images(inputs):
        """`inputs` with its images as one `ImageGroupItems` item, and their ids as one id (vLLM parses and checks
        them one per image before the processor runs)."""
        images = inputs.mm_data_items.get("image")
        if not isinstance(images, ImageProcessorItems) or not images.get_count():
            return inputs
        items = MultiModalDataItems({**inputs.mm_data_items, "image": ImageGroupItems(images.data)})
        uuid_items = dict(inputs.mm_uuid_items or {})
        if uuid_items.get("image") is not None:
            ids = uuid_items["image"]
            uuid_items["image"] = [None if any(i is None for i in ids) else "+".join(map(str, ids))]
        return dataclasses.replace(inputs, mm_data_items=items, mm_uuid_items=uuid_items or None)

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        """One placeholder for the prompt's images; `_get_prompt_updates` expands it to all their visual tokens."""
        return [self.info.image_token_id] * mm_items.get_count("image", strict=False)

    def create_decoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        """The prompt's text tokens: the image placeholders go to the encoder."""
        return [token for token in prompt if token != self.info.image_token_id]

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Per item (a prompt's images): the crops of its images, one after another, and per image its crop count,
        size (H, W), text offset and visual-token count."""
        outputs = {name: [] for name in FIELDS}
        for images in hf_data.get("image_groups") or []:
            offsets = list(hf_kwargs[TEXT_OFFSETS_KWARG])
            for name, value in self.image_group_inputs(images, offsets).items():
                outputs[name].append(value)
        return BatchFeature(outputs)

    def image_group_inputs(self, images: list, offsets: list[int]) -> dict[str, torch.Tensor]:
        """One prompt's images through LLaVA-OneVision's image processor: one image gets its anyres crops; the images of
        a multi-image prompt go in as one sample (a nested list), so each is padded to a square and gets one crop."""
        multi_image = len(images) > 1
        out = self.info.image_processor([images] if multi_image else images, return_tensors="pt")
        sizes = out["image_sizes"]  # (n, 2): height, width
        crops = [out["pixel_values"][i][: 1 if multi_image else None] for i in range(len(images))]
        counts = [self.info.num_image_tokens(int(w), int(h), multi_image) for h, w in sizes.tolist()]
        return {
            "pixel_values": torch.cat(crops),
            "num_crops": torch.tensor([c.shape[0] for c in crops]),
            "image_sizes": sizes,
            "text_offset": torch.tensor(offsets, dtype=torch.long),
            "num_visual_tokens": torch.tensor(counts, dtype=torch.long),
            "num_kept_tokens": torch.tensor(self.info.num_kept_tokens(sizes.tolist()), dtype=torch.long),
        }

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {name: MultiModalFieldConfig.batched("image") for name in FIELDS}

    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs, out_mm_kwargs: MultiModalKwargsItems
    ) -> Sequence[PromptUpdate]:
        if not mm_items.get_count("image", strict=False):
            return []
        sizes = mm_items.get_items("image", ImageGroupItems).image_sizes()
        count = sum(self.info.num_kept_tokens([(h, w) for w, h in sizes]))
        token = self.info.image_token_id
        return [PromptReplacement(modality="image", target=[token], replacement=[token] * count)]
