"""Dense LLaVA-OneVision with token reduction: the baseline VISOR is set against at matched FLOPs.

A thin wrapper around transformers' own `LlavaOnevisionForConditionalGeneration` (its forward is not copied or
patched): the visual tokens are reduced with exactly VISOR's code (`VisorModel.reduce_visual_tokens`, which needs
only LLaVA-OneVision's parts), the prompt is shortened to the surviving tokens, which keep their original RoPE
positions, and the result goes to the model as `inputs_embeds` + `position_ids`.

Usage:
    baseline = TokenReducedLlavaOnevision(llava, {"method": "visionzip", "keep_ratio": 0.25})
    logits = baseline(**inputs).logits            # over the shortened prompt
    tokens = baseline.generate(**inputs, max_new_tokens=16)
"""

from __future__ import annotations

import torch

from .configuration_visor import validate_token_reduction
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
        llava, config = self.llava, self.llava.config
        batch, length = input_ids.shape
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # what generate() would give
        is_visual = input_ids == config.image_token_id
        embeds = llava.get_input_embeddings()(input_ids)
        if self.setting is None or pixel_values is None:
            features = VisorModel.visual_features(llava.model, pixel_values, image_sizes, batch_num_images) if pixel_values is not None else []
            if features:
                embeds = embeds.masked_scatter(is_visual.unsqueeze(-1), torch.cat(features).to(embeds.dtype))
            return {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids, **kwargs}
        features, kept = self.reduce_visual_tokens(pixel_values, image_sizes, batch_num_images)
        restore_index, slot_valid = compact_kept_tokens(is_visual, kept)
        gather = lambda x: x.gather(1, restore_index)
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

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, **kwargs):
        reduced = self.reduce_inputs(input_ids, attention_mask, pixel_values, image_sizes)
        return self.llava.generate(**reduced, **kwargs)
