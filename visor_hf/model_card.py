"""The README.md (model card) of a converted VISOR checkpoint.

It states the base model, where VISOR's layers sit, the configurations with their prefill FLOPs relative to the dense
LLaVA-OneVision at a typical image (from `visor_hf.flops.count_flops`), usage for both transformers lines, and the
Hub metadata: license carried from the source, `library_name: transformers`, `base_model`, tags.

Usage:
    text = model_card(config, base_model="llava-hf/llava-onevision-qwen2-0.5b-ov-hf", license="apache-2.0")
"""

from __future__ import annotations

import re

from .configuration_visor import model_card_usage, num_visual_tokens  # num_visual_tokens: the one count (re-exported)
from .flops import count_flops, num_crops_for_image

TYPICAL_IMAGE = (480, 640)  # (height, width): a VGA photo
TYPICAL_TEXT_TOKENS = 64


def source_license(readme_text: str | None) -> str | None:
    """The `license:` of a model card's YAML front matter, or None."""
    if not readme_text or not readme_text.startswith("---"):
        return None
    front = readme_text.split("---", 2)[1]
    match = re.search(r"^license:\s*(\S+)\s*$", front, flags=re.MULTILINE)
    return match.group(1).strip("'\"") if match else None


def flops_table(config, image_size=TYPICAL_IMAGE, num_text_tokens: int = TYPICAL_TEXT_TOKENS) -> list[dict]:
    """One row per configuration: its self-attention layers and its prefill FLOPs relative to dense LLaVA-OneVision."""
    num_visual = num_visual_tokens(config, image_size)
    num_crops = num_crops_for_image(config, image_size)
    rows = []
    for configuration in config.configurations:
        flops = count_flops(config, num_visual, num_text_tokens, budget=tuple(configuration), num_crops=num_crops)
        rows.append({
            "budget": len(configuration), "self_attn_layers": list(configuration),
            "llm": flops["visor"]["llm"] / flops["dense"]["llm"], "total": flops["visor"]["total"] / flops["dense"]["total"],
        })
    return rows


def model_card(config, base_model: str, license: str | None = None, repo_id: str | None = None,
               base_on_hub: bool = True) -> str:
    """The model card of a freshly converted checkpoint (router untrained, gates at zero). `base_on_hub`: `base_model`
    is a Hub id (it goes into the metadata and gets a link), not a local folder."""
    name = repo_id or "path/to/this/folder"
    num_visual = num_visual_tokens(config, TYPICAL_IMAGE)
    rows = "\n".join(
        f"| {row['budget']} | {row['self_attn_layers']} | {row['llm']:.1%} | {row['total']:.1%} |"
        for row in flops_table(config)
    )
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text"]
    if license:
        front.append(f"license: {license}")
    front += [f"base_model: {base_model}"] if base_on_hub else []
    front += ["tags:", "- visor", "- llava-onevision", "- vision-language", "- efficient-inference", "---"]
    num_layers = config.text_config.num_hidden_layers
    return "\n".join(front) + f"""

# VISOR on {base_model}

[VISOR](https://arxiv.org/abs/2603.23495) (VISion On Request) converted from
{f"[`{base_model}`](https://huggingface.co/{base_model})" if base_on_hub else f"`{base_model}`"} with `python -m visor_hf.convert_llava_ov`.
Every LLaVA-OneVision weight is kept unchanged; visual tokens are never pruned. Text tokens read them through
gated cross-attention layers, and only the self-attention layers of the chosen configuration also run on them.

**This checkpoint is freshly converted, not trained**: the cross-attention gates start at zero and the router is
untrained. At `budget="full"` with every layer in `self_attn_layers` it computes exactly LLaVA-OneVision; smaller
budgets skip visual work and need VISOR training to keep accuracy. The default budget is
`{config.default_budget!r}`.

## Layer placement ({num_layers} language-model layers)

- Cross-attention after layers (`cross_attn_layers`): {config.cross_attn_layers}
- Self-attention layers that may run on visual tokens (`self_attn_layers`): {config.self_attn_layers}
- Routing token: id {config.routing_token_id} (`<|visor_route|>`), appended after each user turn by the chat
  template; its embedding starts at the mean of the tokenizer's embeddings.

## Configurations and cost

Prefill FLOPs relative to the dense LLaVA-OneVision, for one {TYPICAL_IMAGE[1]}x{TYPICAL_IMAGE[0]} image
({num_visual} visual tokens) and {TYPICAL_TEXT_TOKENS} text tokens (2 FLOPs per multiply-add, `visor_hf.flops`):

| budget (k) | self-attention layers | language model | total (with vision encoder) |
| --- | --- | --- | --- |
{rows}

## Usage

{model_card_usage(name, '"full"')}

`budget="full"` above; `budget=k` picks the configuration with k self-attention layers, and `"auto"` the router's
choice once the router is trained.

Works with transformers 4.57 (`AutoModelForVision2Seq`) and 5.x (`AutoModelForImageTextToText`); `AutoModel`
gives the model without its language-model head. No torchvision is needed.
"""
