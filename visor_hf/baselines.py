"""Dense LLaVA-OneVision with token reduction: the baseline VISOR is set against at matched FLOPs.

A thin wrapper around transformers' own `LlavaOnevisionForConditionalGeneration` (its forward is not copied or
patched): the visual tokens are reduced with exactly VISOR's code (`VisorModel.reduce_visual_tokens`, which needs
only LLaVA-OneVision's parts), the prompt is shortened to the surviving tokens, which keep their original RoPE
positions, and the result goes to the model as `inputs_embeds` + `position_ids`.

Inputs are LLaVA-OneVision's, `batch_num_images` included (multi-image prompts: each image of a sample with several
images is its base crop, as the processor expands it); `__call__` and `generate` read them the same way, so the first
generated token is the argmax of the forward's last logits. The image placeholders must match the features the
images give, sample by sample where `batch_num_images` says which images are whose; otherwise a ValueError says so.

Usage:
    baseline = TokenReducedLlavaOnevision(llava, {"method": "visionzip", "keep_ratio": 0.25})
    logits = baseline(**inputs).logits            # over the shortened prompt
    tokens = baseline.generate(**inputs, max_new_tokens=16)
"""

from __future__ import annotations

import torch

from .configuration_visor import TRANSFORMERS_V5, validate_token_reduction
from .modeling_visor import VisorModel, compact_kept_tokens


class TokenReducedLlavaOnevision:
    def __init__(self, llava, token_reduction: dict):
        setting = validate_token_reduction(token_reduction)
        if setting is not None and setting["method"] == "pack":
            raise ValueError("token_reduction 'pack' needs a trained packing layer: it applies to VISOR models only")
        self.llava, self.setting = llava, setting

    @torch.no_grad()
    def reduce_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                      **kwargs) -> dict:
        """LLaVA-OneVision inputs -> `inputs_embeds`, `attention_mask`, `position_ids` of the shortened prompt."""
        llava, config = self.llava, self.llava.config
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # what generate() would give
        is_visual = input_ids == config.image_token_id
        embeds = llava.get_input_embeddings()(input_ids)
        if pixel_values is None:  # then placeholders are an error, whatever batch_num_images says
            check_placeholders(is_visual, [])
            return {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids, **kwargs}
        if self.setting is None:
            features = VisorModel.visual_features(llava.model, pixel_values, image_sizes, batch_num_images)
            check_placeholders(is_visual, [f.shape[0] for f in features], batch_num_images)
            embeds = embeds.masked_scatter(is_visual.unsqueeze(-1), torch.cat(features).to(embeds.dtype))
            return {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids, **kwargs}
        features, kept = self.reduce_visual_tokens(pixel_values, image_sizes, batch_num_images)
        check_placeholders(is_visual, [mask.shape[0] for mask in kept], batch_num_images)
        restore_index, slot_valid = compact_kept_tokens(is_visual, kept)
        gather = lambda x: x.gather(1, restore_index)  # noqa: E731
        is_visual = gather(is_visual) & slot_valid
        embeds = embeds.gather(1, restore_index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        embeds = embeds.masked_scatter(is_visual.unsqueeze(-1), torch.cat(features).to(embeds.dtype))
        return {
            "inputs_embeds": embeds, "attention_mask": gather(attention_mask) * slot_valid,
            "position_ids": gather(position_ids), **kwargs,
        }

    def reduce_visual_tokens(self, pixel_values, image_sizes, batch_num_images=None):
        """Reduced features per image and the kept-token masks: VISOR's own code on LLaVA-OneVision's parts."""
        return VisorModel.reduce_visual_tokens(self.llava.model, pixel_values, image_sizes, batch_num_images, self.setting)

    def __call__(self, **inputs):
        return self.llava(**self.reduce_inputs(**inputs))

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, batch_num_images=None,
                 **kwargs):
        """`llava.generate` on the shortened prompt; the same inputs as `__call__` (`batch_num_images` included).
        Each new token takes the position after the previous one (the prompt keeps its original positions)."""
        reduced = self.reduce_inputs(input_ids, attention_mask, pixel_values, image_sizes, batch_num_images)
        if TRANSFORMERS_V5:  # 5.x's generate extends the caller's position_ids by one a step
            return self.llava.generate(**reduced, **kwargs)
        # 4.57's generate keeps the caller's position_ids as they are, so every new token would take the last
        # prompt position: extend them as 5.x does, for this call only.
        update = self.llava._update_model_kwargs_for_generation

        def update_with_positions(outputs, model_kwargs, *args, **update_kwargs):
            positions = model_kwargs.get("position_ids")
            model_kwargs = update(outputs, model_kwargs, *args, **update_kwargs)
            if positions is not None:
                model_kwargs["position_ids"] = torch.cat([positions, positions[:, -1:] + 1], dim=-1)
            return model_kwargs

        self.llava._update_model_kwargs_for_generation = update_with_positions
        try:
            return self.llava.generate(**reduced, **kwargs)
        finally:
            del self.llava._update_model_kwargs_for_generation  # the class's method again


def check_placeholders(is_visual: torch.Tensor, tokens_per_image: list[int], batch_num_images=None) -> None:
    """The `<image>` placeholders of `input_ids` must be as many as the images' feature tokens: in all, and per sample
    when `batch_num_images` says which images belong to which sample. Raises ValueError naming both counts."""
    placeholders = is_visual.sum(1).tolist()  # per sample
    counts = None if batch_num_images is None else [int(n) for n in batch_num_images]
    if counts is not None and (len(counts) != len(placeholders) or sum(counts) != len(tokens_per_image)):
        raise ValueError(
            f"batch_num_images={counts}: expected one count per sample ({len(placeholders)} samples) adding up to the "
            f"{len(tokens_per_image)} images of pixel_values"
        )
    if sum(placeholders) != sum(tokens_per_image):
        raise ValueError(
            f"input_ids hold {sum(placeholders)} image placeholder tokens (per sample {placeholders}), the images give "
            f"{sum(tokens_per_image)} feature tokens (per image {tokens_per_image}); expand the placeholders with the "
            "processor (a prompt cut by truncation loses some), and pass batch_num_images for multi-image prompts"
        )
    if counts is None:
        return
    starts = [sum(counts[:b]) for b in range(len(counts))]
    expected = [sum(tokens_per_image[start : start + n]) for start, n in zip(starts, counts)]
    if expected != placeholders:
        raise ValueError(
            f"input_ids hold {placeholders} image placeholder tokens per sample, their images give {expected} "
            f"(batch_num_images={counts}); expand the placeholders with the processor"
        )
