"""VisorProcessor: LLaVA-OneVision's inputs for VISOR, plus the routing token.

What it does:
- Images go through LLaVA-OneVision's own image processor (anyres crops, `pixel_values` + `image_sizes` +
  `batch_num_images`), the PIL one: `LlavaOnevisionImageProcessor` on 4.57, `LlavaOnevisionImageProcessorPil` on
  5.x. Nothing here needs torchvision (on 5.x `LlavaOnevisionProcessor` does, for its video processor), which is why
  this class composes the image processor and the tokenizer itself instead of subclassing it.
- Each `<image>` of the text is expanded into as many image tokens as the model makes for that image: the base crop,
  the unpadded anyres grid with one newline token a row, shrunk to `anyres_max_N` crops (the counting of
  `LlavaOnevisionModel.pack_image_features`); an image of a multi-image sample is its base crop plus one newline.
- The chat template is Qwen2's (`<|im_start|>role\\n...<|im_end|>\\n`, default system prompt) with LLaVA-OneVision's
  `<image>\\n` before the text, and the routing token appended after each user turn: the router of VISOR reads
  its hidden state to choose how many self-attention layers the visual tokens get. A prompt written without the
  template can hold `processor.routing_token` itself; without one, `budget="auto"` falls back to the default.

This file is shipped to the Hub next to the weights: it imports only transformers (and PIL through it).

Usage:
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import transformers
from transformers import AutoTokenizer, BatchFeature, PretrainedConfig, ProcessorMixin

from .configuration_visor import TRANSFORMERS_V5, is_generic_model_card, num_video_tokens, num_visual_tokens

# The PIL image processor of LLaVA-OneVision on each line (on 5.x the unsuffixed name is the torchvision one).
IMAGE_PROCESSOR_CLASS = "LlavaOnevisionImageProcessorPil" if TRANSFORMERS_V5 else "LlavaOnevisionImageProcessor"

ROUTING_TOKEN = "<|visor_route|>"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}{{- 'IMAGE_TOKEN\\n' -}}"
    "{%- elif content['type'] == 'video' -%}{{- 'VIDEO_TOKEN\\n' -}}"
    "{%- elif content['type'] == 'text' -%}{{- content['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- 'ROUTING_TOKEN' -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
).replace("IMAGE_TOKEN", IMAGE_TOKEN).replace("VIDEO_TOKEN", VIDEO_TOKEN).replace("ROUTING_TOKEN", ROUTING_TOKEN)


class VisorProcessor(ProcessorMixin):
    r"""LLaVA-OneVision's image processor and tokenizer, with VISOR's routing token in the chat template.

    Args:
        image_processor: LLaVA-OneVision's PIL image processor (`IMAGE_PROCESSOR_CLASS`).
        tokenizer: The model's tokenizer; it must hold `image_token` and `routing_token` as single tokens.
        num_image_tokens (`int`): Visual tokens of one crop, (image size / patch size)^2 (729 for SigLIP-384/14).
        vision_feature_select_strategy (`str`): As in the model config; "default" drops the CLS token.
        vision_aspect_ratio (`str`): As in the model config, "anyres_max_N".
        chat_template (`str`, *optional*): Defaults to `CHAT_TEMPLATE`.
        image_token, routing_token (`str`): The placeholder of an image and the routing token.
        video_token (`str`): The placeholder of a video; optional in the tokenizer (without it, `videos=` is an error).

    Videos need no torchvision: each frame is resized to the crop size (bicubic), rescaled and normalised with the image
    processor's settings, as LLaVA-OneVision's video processor does, with numpy.
    """

    attributes = ["image_processor", "tokenizer"]  # 4.57 reads this list; 5.x reads the names of `__init__`
    image_processor_class = IMAGE_PROCESSOR_CLASS
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 729,
        vision_feature_select_strategy: str = "full",
        vision_aspect_ratio: str = "anyres_max_9",
        chat_template: str | None = None,
        image_token: str = IMAGE_TOKEN,
        routing_token: str = ROUTING_TOKEN,
        video_token: str = VIDEO_TOKEN,
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_aspect_ratio = vision_aspect_ratio
        self.image_token = image_token
        self.routing_token = routing_token
        self.video_token = video_token
        self.video_token_id = None
        if tokenizer is not None:
            ids = tokenizer.encode(video_token, add_special_tokens=False)
            self.video_token_id = ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None
            self.image_token_id = self._single_token_id(tokenizer, image_token, "image_token")
            self.routing_token_id = self._single_token_id(tokenizer, routing_token, "routing_token")
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @staticmethod
    def _single_token_id(tokenizer, token: str, name: str) -> int:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"{name}={token!r} is not a single token of this tokenizer (it encodes to {ids}); a VISOR tokenizer "
                "comes from `python -m visor_hf.convert_llava_ov`, which adds the routing token"
            )
        return ids[0]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """The PIL image processor by its class (5.x's AutoImageProcessor would pick the torchvision one) and the
        tokenizer through AutoTokenizer, the same on both transformers lines. The tokenizer is what
        tokenizer_config.json says: AutoTokenizer gets a blank config so that it does not read config.json, whose
        model type is custom code (5.x would ask for `trust_remote_code` just to load a tokenizer)."""
        image_processor_class = getattr(transformers, IMAGE_PROCESSOR_CLASS)
        tokenizer_kwargs = {"config": PretrainedConfig(), **kwargs}
        return [
            image_processor_class.from_pretrained(pretrained_model_name_or_path, **kwargs),
            AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **tokenizer_kwargs),
        ]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos"]

    def __call__(self, images=None, text=None, videos=None, audio=None, images_kwargs=None, **text_kwargs) -> BatchFeature:
        """Prepare model inputs.

        Args:
            images: A PIL image (or array), a list of them (one per `<image>` of the batch, in order), or a list of
                lists (the images of each sample; a sample with several images gets LLaVA-OneVision's multi-image
                treatment).
            text: A string or a list of strings, each holding one `image_token` per image.
            images_kwargs: Passed to the image processor.
            text_kwargs: Passed to the tokenizer (`return_tensors`, `padding`, `padding_side`, ...).

            videos: A video (a list of frames: PIL images or (H, W, C) arrays, or one (frames, H, W, C) array) or a list
                of them, one per `video_token` of the batch, in order; every video of a batch has the same frame count.

        Returns a `BatchFeature` with `input_ids`, `attention_mask` and, with images, `pixel_values`, `image_sizes` and
        `batch_num_images`, with videos `pixel_values_videos` (videos, frames, 3, H, W): what
        `VisorForConditionalGeneration.forward` and `generate` take. Empty lists count as none (lmms-eval passes them).
        """
        images = None if isinstance(images, (list, tuple)) and len(images) == 0 else images
        videos = None if isinstance(videos, (list, tuple)) and len(videos) == 0 else videos
        audio = None if isinstance(audio, (list, tuple)) and len(audio) == 0 else audio
        if audio is not None:
            raise ValueError("VisorProcessor takes images, videos and text (audio is not supported)")
        if text is None:
            raise ValueError(f"VisorProcessor needs `text`, with one {self.image_token!r} per image")
        texts = [text] if isinstance(text, str) else list(text)
        return_tensors = text_kwargs.pop("return_tensors", None)
        text_kwargs.setdefault("return_token_type_ids", False)
        num_placeholders = sum(t.count(self.image_token) for t in texts)

        image_inputs = {}
        if images is not None:
            image_inputs = self.image_processor(images, return_tensors=return_tensors, **(images_kwargs or {}))
            texts = self._expand_image_tokens(texts, image_inputs)
        elif num_placeholders:
            raise ValueError(f"the text holds {num_placeholders} {self.image_token!r} placeholders but no images were given")
        video_inputs = {}
        num_video_placeholders = sum(t.count(self.video_token) for t in texts)
        if videos is not None or num_video_placeholders:
            video_inputs = self._video_inputs(videos, num_video_placeholders)
            frames = video_inputs["pixel_values_videos"].shape[1]
            count = num_video_tokens(self._vision_shape(), frames)
            marker = "\0visor-video\0"  # keeps expanded tokens from being matched again
            texts = [t.replace(self.video_token, marker * count).replace(marker, self.video_token) for t in texts]
        text_inputs = self.tokenizer(texts, return_tensors=return_tensors, **text_kwargs)
        return BatchFeature(data={**text_inputs, **image_inputs, **video_inputs}, tensor_type=return_tensors)

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        """push_to_hub's upload step: transformers' generic card (written when the Hub repo has none) is not uploaded;
        the model's push writes VISOR's card, and a card already on the Hub is kept."""
        readme = os.path.join(working_dir, "README.md")
        if os.path.isfile(readme):
            with open(readme, encoding="utf-8") as f:
                generic = is_generic_model_card(f.read())
            if generic:
                os.remove(readme)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    def _vision_shape(self) -> SimpleNamespace:
        """The vision tower's crop and patch size, as a model config holds them (for the token counts)."""
        size = self.image_processor.size
        crop = size["height"] if "height" in size else size["shortest_edge"]
        return SimpleNamespace(vision_config=SimpleNamespace(image_size=crop, patch_size=crop // math.isqrt(self.num_image_tokens)))

    def _video_inputs(self, videos, num_placeholders: int) -> dict:
        """`pixel_values_videos` (videos, frames, 3, crop, crop) as a numpy array: each frame resized to the crop size
        (bicubic), rescaled to [0, 1] and normalised with the image processor's mean and std."""
        import numpy as np
        from transformers.image_transforms import normalize, resize, to_channel_dimension_format
        from transformers.image_utils import ChannelDimension, PILImageResampling, infer_channel_dimension_format, to_numpy_array

        if self.video_token_id is None:
            raise ValueError(f"this tokenizer has no {self.video_token!r} token, so it cannot take videos")
        if videos is None:
            raise ValueError(f"the text holds {num_placeholders} {self.video_token!r} placeholders but no videos were given")
        single = isinstance(videos, np.ndarray) and videos.ndim == 4 or (
            isinstance(videos, (list, tuple)) and len(videos) and not isinstance(videos[0], (list, tuple, np.ndarray))
        )
        videos = [videos] if single else list(videos)
        if len(videos) != num_placeholders:
            raise ValueError(
                f"the text holds {num_placeholders} {self.video_token!r} placeholders for {len(videos)} videos; "
                "give one placeholder per video"
            )
        frame_counts = sorted({len(video) for video in videos})
        if len(frame_counts) != 1 or frame_counts[0] == 0:
            raise ValueError(f"every video of a batch needs the same number of frames (at least one); got {frame_counts}")
        crop = self._vision_shape().vision_config.image_size
        mean, std = self.image_processor.image_mean, self.image_processor.image_std
        processed = []
        for video in videos:
            frames = []
            for frame in video:
                frame = to_numpy_array(frame.convert("RGB") if hasattr(frame, "convert") else frame)
                layout = infer_channel_dimension_format(frame)
                frame = resize(frame, (crop, crop), resample=PILImageResampling.BICUBIC, input_data_format=layout)
                frame = frame.astype(np.float32) / 255.0 if frame.dtype == np.uint8 else frame.astype(np.float32)
                frame = normalize(frame, mean, std, input_data_format=layout)
                frames.append(to_channel_dimension_format(frame, ChannelDimension.FIRST, input_channel_dim=layout))
            processed.append(np.stack(frames))
        return {"pixel_values_videos": np.stack(processed)}

    def _expand_image_tokens(self, texts: list[str], image_inputs) -> list[str]:
        """Replace each image placeholder with the number of image tokens the model makes for that image."""
        sizes = [[int(x) for x in size] for size in image_inputs["image_sizes"]]
        batch_num_images = [int(n) for n in image_inputs["batch_num_images"]]
        pixel_values = image_inputs["pixel_values"]
        crop_height, crop_width = (pixel_values[0][0].shape[-2:])
        num_placeholders = sum(t.count(self.image_token) for t in texts)
        if num_placeholders != len(sizes):
            raise ValueError(
                f"the text holds {num_placeholders} {self.image_token!r} placeholders for {len(sizes)} images; "
                "give one placeholder per image"
            )
        multi_image = [n > 1 for n in batch_num_images for _ in range(n)]  # per image: its sample has several
        counts = iter(
            self.num_image_tokens_of(height, width, crop_height, crop_width, multi)
            for (height, width), multi in zip(sizes, multi_image)
        )
        marker = "\0visor-image\0"  # keeps expanded tokens from being matched again
        expanded = []
        for text in texts:
            while self.image_token in text:
                text = text.replace(self.image_token, marker * next(counts), 1)
            expanded.append(text.replace(marker, self.image_token))
        return expanded

    def num_image_tokens_of(self, height: int, width: int, crop_height: int, crop_width: int, multi_image: bool = False) -> int:
        """Visual tokens of an image of `height` x `width` pixels: `configuration_visor.num_visual_tokens` (the one
        count of the package) asked with this processor's settings: square crops of `crop_height` pixels
        (`crop_width` is the same for LLaVA-OneVision) of `num_image_tokens` tokens each, the image processor's
        pinpoints, `vision_aspect_ratio` and `vision_feature_select_strategy`."""
        side = math.isqrt(self.num_image_tokens)  # tokens along a crop's side (27 for SigLIP-384/14)
        patch = max(1, crop_height // side)
        if side * side != self.num_image_tokens or crop_height // patch != side:
            raise ValueError(
                f"num_image_tokens={self.num_image_tokens} is not (crop size // patch size)^2 for crops of "
                f"{crop_height} x {crop_width} pixels"
            )
        settings = SimpleNamespace(  # the fields of a model config that the count reads
            vision_config=SimpleNamespace(image_size=crop_height, patch_size=patch),
            image_grid_pinpoints=self.image_processor.image_grid_pinpoints,
            vision_aspect_ratio=self.vision_aspect_ratio,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
        )
        return num_visual_tokens(settings, (height, width), multi_image=multi_image)


VisorProcessor.register_for_auto_class("AutoProcessor")  # save_pretrained copies this file and writes its auto_map

__all__ = ["VisorProcessor"]
