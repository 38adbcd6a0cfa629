"""Configuration of VISOR (VISion On Request) models built on LLaVA-OneVision.

`VisorConfig` holds LLaVA-OneVision's fields unchanged (a SigLIP `vision_config`, a Qwen2 `text_config`,
the projector and anyres settings) plus where VISOR's layers sit:

- `cross_attn_layers`: after these language-model layers the text reads the visual tokens through a
  gated cross-attention (always executed).
- `self_attn_layers`: the language-model layers that may also run on the visual tokens (standard
  self-attention over `[V; T]`). Which of them run is chosen per sample among `configurations`.
- `configurations`: the viable subsets of `self_attn_layers`, cheapest first.

All validation and derived values live in `_validate` and `default_layers`; nothing else checks
indices. This file is shipped to the Hub next to the weights and imports only transformers.

Usage:
    config = VisorConfig.from_llava_onevision_config(llava_config)   # 8 + 8 layers on a 24-layer LLM
"""

from __future__ import annotations

import math

import transformers
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING

# The one switch between the two supported transformers lines (4.57.x and 5.x); every other file imports it.
TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5

# The code files a Hub repository carries next to the weights (they import only each other, torch, transformers, PIL).
HUB_CODE_FILES = ("configuration_visor.py", "modeling_visor.py", "processing_visor.py")

try:  # transformers >= 5
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers 4.57
    SubConfigSpec = None

AUTO_MAP = {
    "AutoConfig": "configuration_visor.VisorConfig",
    "AutoModel": "modeling_visor.VisorModel",
    "AutoModelForImageTextToText": "modeling_visor.VisorForConditionalGeneration",
    "AutoModelForVision2Seq": "modeling_visor.VisorForConditionalGeneration",
    "AutoProcessor": "processing_visor.VisorProcessor",
}

BUDGET_HELP = (
    "'auto' (router), 'full' (all self-attention layers), an int k (the configuration with k "
    "self-attention layers), a tuple of layer indices (one of config.configurations), or a list with "
    "one of these per sample"
)


def spread_layers(count: int, num_layers: int, last: bool) -> list[int]:
    """`count` layer indices spread uniformly over `num_layers`: centred in their slot, or at its end if `last`.

    With 24 layers and 8 indices: 1, 4, ..., 22 (centred) and 2, 5, ..., 23 (last).
    """
    step = num_layers / count if count else 0
    if last:
        return sorted({int((i + 1) * step) - 1 for i in range(count)})
    return sorted({int((i + 0.5) * step) for i in range(count)})


TOKEN_REDUCTION_METHODS = ("pack", "visionzip", "vispruner")
TOKEN_REDUCTION_DEFAULTS = {
    "pack": {},
    # VisionZip keeps dominant : contextual tokens at 54 : 10; scores from SigLIP's penultimate layer.
    "visionzip": {"dominant_fraction": 54 / 64, "score_layer": -2},
    # VisPruner keeps important : diverse tokens at 1 : 1 by default.
    "vispruner": {"important_fraction": 0.5, "score_layer": -2},
}


def validate_token_reduction(setting) -> dict | None:
    """A token-reduction setting in its full form, or None for no reduction.

    Accepted: None, "none" or False (no reduction); a dict with "method" in TOKEN_REDUCTION_METHODS and either
    "keep_ratio" in (0, 1] or, for "pack", "pack_factor" k >= 1 (keep ratio 1/k); method-specific fields get their
    defaults (visionzip: dominant_fraction, score_layer; vispruner: important_fraction, score_layer).
    A keep ratio of 1 means no reduction.
    """
    if setting is None or setting is False or setting == "none":
        return None
    if not isinstance(setting, dict):
        raise ValueError(
            f"token_reduction={setting!r}: use None/'none' or a dict like {{'method': 'visionzip', 'keep_ratio': 0.25}}"
        )
    method = setting.get("method")
    if method not in TOKEN_REDUCTION_METHODS:
        raise ValueError(f"token_reduction method={method!r}: allowed methods are {TOKEN_REDUCTION_METHODS}")
    full = {**TOKEN_REDUCTION_DEFAULTS[method], **setting}
    allowed_keys = {"method", "keep_ratio", *(["pack_factor"] if method == "pack" else []), *TOKEN_REDUCTION_DEFAULTS[method]}
    unknown = sorted(set(full) - allowed_keys)
    if unknown:
        raise ValueError(f"token_reduction: unknown fields {unknown} for method {method!r}; allowed: {sorted(allowed_keys)}")
    if method == "pack":
        factor = full.get("pack_factor")
        if factor is None:
            ratio = full.get("keep_ratio")
            if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"token_reduction keep_ratio={ratio!r}: must be in (0, 1]")
            factor = round(1 / ratio)
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"token_reduction pack_factor={factor!r}: must be an integer >= 1")
        full["pack_factor"], full["keep_ratio"] = factor, 1 / factor
    ratio = full.get("keep_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"token_reduction keep_ratio={ratio!r}: must be in (0, 1]")
    for name in ("dominant_fraction", "important_fraction"):
        if name in full and not 0 <= full[name] <= 1:
            raise ValueError(f"token_reduction {name}={full[name]!r}: must be in [0, 1]")
    return None if ratio == 1 else full


def spread_subset(layers: list[int], k: int) -> tuple[int, ...]:
    """The evenly spread subset of `k` elements of the sorted `layers`."""
    if k == 0:
        return ()
    n = len(layers)
    return tuple(layers[min(n - 1, int((j + 0.5) * n / k))] for j in range(k))


def num_video_tokens(config, num_frames: int) -> int:
    """Visual tokens LLaVA-OneVision makes of a video of `num_frames` frames: each frame's crop pooled 2 x 2 (a side of
    ceil(image_size / patch_size / 2) tokens: 14 x 14 = 196 at 384 px), plus one newline token after the last frame.
    `config`: anything with `vision_config.image_size` and `vision_config.patch_size`."""
    side = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)
    return num_frames * side * side + 1


def num_visual_tokens(config, image_size, multi_image: bool = False) -> int:
    """Visual tokens LLaVA-OneVision makes of one image of `image_size` (height, width) pixels.

    The one owner of this count: the processor (placeholders to expand), FLOPs, the model card, the test helpers and
    the toy world ask it. `config` is a `VisorConfig` or a `LlavaOnevisionConfig` (anything with
    `vision_config.image_size`, `vision_config.patch_size`, `image_grid_pinpoints`, `vision_aspect_ratio` and
    `vision_feature_select_strategy`). Counted as `LlavaOnevisionModel.pack_image_features` packs the features:

    - an image alone in its sample: the base crop's tokens; then the anyres grid of the pinpoint
      `select_best_resolution` picks, with the rows (or columns) of its padding removed (`unpad_image`), shrunk by
      bilinear interpolation when it holds more than 1.1^2 times `anyres_max_N` crops' worth; one newline token a row;
    - `multi_image` (one of several images in its sample): the base crop's tokens and one newline token.

    With `vision_feature_select_strategy="default"` the count is one less (the CLS token), as transformers'
    LLaVA-OneVision processor counts it.
    """
    import math  # imported here: the rest of this file needs neither

    from transformers.image_processing_utils import select_best_resolution

    crop = config.vision_config.image_size
    side = crop // config.vision_config.patch_size  # tokens along a crop's side (27 for SigLIP-384/14)
    base = side * side - (1 if config.vision_feature_select_strategy == "default" else 0)
    if multi_image:
        return base + 1
    height, width = (int(x) for x in image_size)
    best_height, best_width = select_best_resolution([height, width], config.image_grid_pinpoints)
    rows, cols = side * (best_height // crop), side * (best_width // crop)  # the grid's tokens, padding included
    # unpad_image: the image was resized into the grid keeping its aspect ratio, then padded on the other axis
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    max_crops = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_crops * side * side))
    if ratio > 1.1:  # the model interpolates the grid down to this size
        rows, cols = int(rows // ratio), int(cols // ratio)
    return base + rows * cols + rows  # base crop + grid + one newline a row


class VisorConfig(PretrainedConfig):
    r"""Configuration of [`VisorForConditionalGeneration`].

    Args:
        vision_config, text_config, image_token_index, projector_hidden_act, vision_feature_select_strategy,
        vision_feature_layer, vision_aspect_ratio, image_grid_pinpoints, multimodal_projector_bias,
        tie_word_embeddings:
            As in `LlavaOnevisionConfig` (SigLIP vision tower, Qwen2 language model). `tie_word_embeddings`
            is always written explicitly (Qwen2-0.5B ties its embeddings, 7B does not).
        cross_attn_layers (`list[int]`, *optional*):
            Language-model layers followed by a gated cross-attention from text to visual tokens.
            Defaults to L/3 layers spread uniformly, ending at the last layer (2, 5, ..., 23 for L = 24).
        self_attn_layers (`list[int]`, *optional*):
            Layers that may run self-attention over visual and text tokens. Defaults to L/3 layers spread
            uniformly (1, 4, ..., 22 for L = 24).
        configurations (`list[list[int]]`, *optional*):
            Viable subsets of `self_attn_layers`, ordered by cost (number of layers). Defaults to one evenly
            spread subset for every k = 0..len(self_attn_layers).
        cpe_kernel_size (`int`, defaults to 7):
            Kernel of the depth-wise 1D convolution of the conditional positional encoding (odd).
        default_budget (`str` or `int`, defaults to `"full"`):
            Budget used when `forward`/`generate` get none. Lives here, never in `generation_config`.
        routing_token_id (`int`, *optional*):
            Id of the routing token the processor appends after each question (set by the converter).
        router_hidden_size (`int`, *optional*):
            Hidden width of the router MLP; defaults to the language model's hidden size // 4.
        token_reduction (`dict`, *optional*):
            Default token reduction of the visual tokens before the decoder (see `validate_token_reduction`),
            e.g. `{"method": "pack", "pack_factor": 2}` (VISOR-TR, needs a trained packing layer) or
            `{"method": "visionzip", "keep_ratio": 0.25}`. Overridable per call like `budget`.
    """

    model_type = "visor"
    attribute_map = {"image_token_id": "image_token_index", "video_token_id": "video_token_index"}
    # transformers 4.57 reads `sub_configs`, 5.x `sub_configs_defaults` (and derives `sub_configs` from it)
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
            "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        }

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        image_token_index: int = 151646,
        video_token_index: int = 151647,
        projector_hidden_act: str = "gelu",
        vision_feature_select_strategy: str = "full",
        vision_feature_layer: int | list[int] = -1,
        vision_aspect_ratio: str = "anyres_max_9",
        image_grid_pinpoints: list | None = None,
        multimodal_projector_bias: bool = True,
        tie_word_embeddings: bool = False,
        cross_attn_layers: list[int] | None = None,
        self_attn_layers: list[int] | None = None,
        configurations: list[list[int]] | None = None,
        cpe_kernel_size: int = 7,
        default_budget: str | int = "full",
        routing_token_id: int | None = None,
        router_hidden_size: int | None = None,
        token_reduction: dict | None = None,
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = CONFIG_MAPPING[vision_config.get("model_type", "siglip_vision_model")](**vision_config)
        elif vision_config is None:
            vision_config = CONFIG_MAPPING["siglip_vision_model"](
                hidden_size=1152, intermediate_size=4304, patch_size=14, image_size=384,
                num_hidden_layers=26, num_attention_heads=16, vision_use_head=False,
            )
        if isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config.get("model_type", "qwen2")](**text_config)
        elif text_config is None:
            text_config = CONFIG_MAPPING["qwen2"]()
        self.vision_config = vision_config
        self.text_config = text_config

        self.image_token_index = image_token_index
        self.video_token_index = video_token_index
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_feature_layer = vision_feature_layer
        self.vision_aspect_ratio = vision_aspect_ratio
        self.image_grid_pinpoints = image_grid_pinpoints if image_grid_pinpoints is not None else [
            [384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)
        ]
        self.multimodal_projector_bias = multimodal_projector_bias

        num_layers = text_config.num_hidden_layers
        default_cross, default_self = self.default_layers(num_layers)
        self.cross_attn_layers = sorted(cross_attn_layers) if cross_attn_layers is not None else default_cross
        self.self_attn_layers = sorted(self_attn_layers) if self_attn_layers is not None else default_self
        if configurations is None:
            configurations = [spread_subset(self.self_attn_layers, k) for k in range(len(self.self_attn_layers) + 1)]
        self.configurations = sorted((sorted(c) for c in configurations), key=lambda c: (len(c), c))
        self.cpe_kernel_size = cpe_kernel_size
        self.default_budget = default_budget
        self.routing_token_id = routing_token_id
        self.router_hidden_size = router_hidden_size or max(1, text_config.hidden_size // 4)
        self.token_reduction = validate_token_reduction(token_reduction)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        # `pipeline("image-text-to-text", ..., trust_remote_code=True)` takes `budget` as a call argument through it
        kwargs.setdefault("custom_pipelines", {"image-text-to-text": {
            "impl": "modeling_visor.VisorImageTextToTextPipeline", "pt": ["AutoModelForImageTextToText"],
            "type": "multimodal",
        }})
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate()

    @staticmethod
    def default_layers(num_layers: int) -> tuple[list[int], list[int]]:
        """The paper's upper bound |C| = |S| = L/3, spread uniformly: (cross_attn_layers, self_attn_layers)."""
        count = max(1, num_layers // 3)
        return spread_layers(count, num_layers, last=True), spread_layers(count, num_layers, last=False)

    def resolve_budget(self, budget) -> tuple[int, ...] | None:
        """The self-attention layers one budget runs; None for "auto" (the router decides per sample).

        "full": all `self_attn_layers`; int k: the first configuration with k layers; a tuple: one of
        `configurations` (or all `self_attn_layers`). Anything else raises `ValueError` naming the allowed values.
        """
        configurations = [tuple(c) for c in self.configurations]
        if isinstance(budget, str):
            if budget == "full":
                return tuple(self.self_attn_layers)
            if budget == "auto":
                return None
            raise ValueError(f"budget={budget!r} is not allowed: use {BUDGET_HELP}")
        if isinstance(budget, int) and not isinstance(budget, bool):
            for configuration in configurations:
                if len(configuration) == budget:
                    return configuration
            counts = sorted({len(c) for c in configurations})
            raise ValueError(f"budget={budget}: no configuration has {budget} self-attention layers; allowed: {counts}")
        if isinstance(budget, tuple):
            layers = tuple(sorted(budget))
            if layers in configurations or layers == tuple(self.self_attn_layers):
                return layers
            raise ValueError(f"budget={budget}: not one of config.configurations {configurations}")
        raise ValueError(f"budget={budget!r} has type {type(budget).__name__}: use {BUDGET_HELP}")

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def router_layer(self) -> int:
        """The router reads the routing token right before this layer: the first self-attention layer that
        some configuration skips (layers before it run the same way whatever the configuration)."""
        always = set(self.self_attn_layers).intersection(*map(set, self.configurations)) if self.configurations else set()
        skippable = [layer for layer in self.self_attn_layers if layer not in always]
        return skippable[0] if skippable else self.num_layers

    def _validate(self) -> None:
        num_layers = self.num_layers
        for field in ("cross_attn_layers", "self_attn_layers"):
            layers = getattr(self, field)
            bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"{field}={layers}: indices {bad} are outside the allowed range 0..{num_layers - 1}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"{field}={layers}: duplicate layer indices")
        allowed = set(self.self_attn_layers)
        for configuration in self.configurations:
            if not set(configuration) <= allowed:
                raise ValueError(
                    f"configurations: {configuration} is not a subset of self_attn_layers={self.self_attn_layers}"
                )
            if len(set(configuration)) != len(configuration):
                raise ValueError(f"configurations: {configuration} has duplicate layer indices")
        if len({tuple(c) for c in self.configurations}) != len(self.configurations):
            raise ValueError(f"configurations={self.configurations}: the same configuration appears twice")
        if not (isinstance(self.cpe_kernel_size, int) and self.cpe_kernel_size > 0 and self.cpe_kernel_size % 2 == 1):
            raise ValueError(f"cpe_kernel_size={self.cpe_kernel_size}: must be a positive odd integer")
        if self.default_budget == "auto" and self.routing_token_id is None:
            raise ValueError("default_budget='auto' needs routing_token_id (a converted model with a router)")

    @classmethod
    def from_llava_onevision_config(cls, llava_config, **overrides) -> "VisorConfig":
        """A VisorConfig with the fields of a `LlavaOnevisionConfig` and VISOR's settings from `overrides`."""
        fields = dict(
            vision_config=llava_config.vision_config.to_dict(),
            text_config=llava_config.text_config.to_dict(),
            image_token_index=llava_config.image_token_id,
            video_token_index=llava_config.video_token_id,
            projector_hidden_act=llava_config.projector_hidden_act,
            vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
            vision_feature_layer=llava_config.vision_feature_layer,
            vision_aspect_ratio=llava_config.vision_aspect_ratio,
            image_grid_pinpoints=llava_config.image_grid_pinpoints,
            multimodal_projector_bias=getattr(llava_config, "multimodal_projector_bias", True),
            tie_word_embeddings=bool(
                getattr(llava_config, "tie_word_embeddings", False)
                or getattr(llava_config.text_config, "tie_word_embeddings", False)
            ),
        )
        fields.update(overrides)
        return cls(**fields)


# The card transformers' push_to_hub writes when the Hub repo has none (huggingface_hub's template): VISOR's replaces it.
GENERIC_MODEL_CARD_MARKERS = ("# Model Card for Model ID", "This model card has been automatically generated.")


def is_generic_model_card(text: str | None) -> bool:
    """True for a missing card or transformers' generic "Model Card for Model ID" (what `push_to_hub` uploads when
    the repo has no card); False for any card someone wrote, which is never replaced."""
    return not text or not text.strip() or any(marker in text for marker in GENERIC_MODEL_CARD_MARKERS)


def model_card_usage(name: str, budget: str) -> str:
    """The model cards' "how to load" block (this file's card and the converter's): `budget` as written in the code."""
    return f"""```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor  # 4.57: AutoModelForVision2Seq also works

model = AutoModelForImageTextToText.from_pretrained("{name}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in this image?"}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("photo.jpg"), text=text, return_tensors="pt")
out = model.generate(**inputs, budget={budget}, max_new_tokens=64)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def model_card_text(config, repo_id: str | None = None) -> str:
    """A model card (README.md) for a VISOR checkpoint, from its config alone: Hub metadata, where VISOR's layers
    sit, the budgets and how to load it on both transformers lines.

    What `save_pretrained` writes into a folder that has no README.md and what `push_to_hub` uploads instead of
    transformers' generic card. It claims nothing it cannot know from the config (whether the router or the gates
    are trained); the converter writes a richer card (`visor_hf.model_card`: base model, license, FLOPs per budget).
    """
    name = repo_id or "path/to/this/folder"
    text, vision = config.text_config, config.vision_config
    rows = "\n".join(f"| `{len(c)}` | {list(c) or 'none'} |" for c in config.configurations)
    routed = config.routing_token_id is not None
    reduction = "none" if config.token_reduction is None else f"`{config.token_reduction}`"
    example_budget = "auto" if config.default_budget == "auto" else "full"
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- visor
- llava-onevision
- vision-language
- efficient-inference
---

# VISOR (VISion On Request) on LLaVA-OneVision

A [VISOR](https://arxiv.org/abs/2603.23495) checkpoint: LLaVA-OneVision whose text reads the visual tokens through
gated cross-attention layers, while only the self-attention layers of the chosen configuration also run on the
visual tokens. Visual tokens are never pruned. The model code ships in this repository (`trust_remote_code=True`).

## Configuration

| field | value |
| --- | --- |
| language model | {text.model_type}, {text.num_hidden_layers} layers, hidden size {text.hidden_size}, {text.num_attention_heads} heads ({getattr(text, "num_key_value_heads", None) or text.num_attention_heads} key/value) |
| vision tower | {vision.model_type}, {vision.image_size} px crops of {vision.patch_size} px patches, `{config.vision_aspect_ratio}` |
| cross-attention after layers (`cross_attn_layers`) | {config.cross_attn_layers} |
| self-attention layers that may run on visual tokens (`self_attn_layers`) | {config.self_attn_layers} |
| default budget (`default_budget`) | `{config.default_budget!r}` |
| routing token (`routing_token_id`) | {config.routing_token_id if routed else "none (no router: use a fixed budget)"} |
| token reduction (`token_reduction`) | {reduction} |

## Budgets

`budget` on `forward`/`generate` chooses which self-attention layers run on the visual tokens: `"full"` (all of
`self_attn_layers`), an int k (the configuration with k layers, below), a tuple of layer indices,
{'`"auto"` (the router picks per sample from its routing token), ' if routed else ''}or a list with one of these per sample.

| budget (k) | self-attention layers |
| --- | --- |
{rows}

## How to load

{model_card_usage(name, f'"{example_budget}"')}

Works with transformers 4.57 and 5.x (`AutoModelForVision2Seq` on 4.57 too). No torchvision is needed for images.
"""


__all__ = ["VisorConfig"]
