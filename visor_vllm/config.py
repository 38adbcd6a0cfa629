"""The config vLLM reads for a VISOR checkpoint: `visor_hf`'s `VisorConfig` plus what serving needs.

- `is_encoder_decoder = True`: vLLM runs VISOR as an encoder-decoder model (the encoder is SigLIP + projector +
  anyres packing; the decoder prompt holds the text only), so every text layer's KV cache holds text only and the
  cross-attention caches hold the visual keys/values once, sized by the encoder length. It is set here and not in
  config.json, where transformers' `generate` would take the model for an encoder-decoder one.
- A top-level `rope_parameters` with an `mrope_section`: vLLM then asks the model for each prompt's positions
  (`get_mrope_input_positions`), which is how the text tokens get their positions in LLaVA-OneVision's dense
  sequence back. The text layers read row 0 with Qwen2's plain 1-D rotary embedding; row 1 carries how many visual
  tokens each text token may read (see `model.VisorForConditionalGeneration.get_mrope_input_positions`).
- `decoder_start_token_id`: vLLM requires one; it is never used (`skip_decoder_start_token` in the processor).
- `token_reduction` (as in `VisorConfig`): served too, shortening the encoder sequence; `served_token_reduction`.
- `serve_self_attn_layers`: the fixed self-attention set S of this deployment (empty: budget 0), as layers, an int
  budget or "full". Set it at launch with `hf_overrides={"serve_self_attn_layers": [5]}`.

`register_config` puts the class in vLLM's config registry, so `LLM(model=DIR)` needs no `trust_remote_code` and no
overrides.
"""

from __future__ import annotations

from visor_hf.configuration_visor import VisorConfig, validate_token_reduction


class VisorServingConfig(VisorConfig):
    """`VisorConfig` as vLLM serves it (see the module docstring)."""

    def __init__(self, serve_self_attn_layers: list[int] | int | str = (), **kwargs):
        kwargs.pop("is_encoder_decoder", None)
        super().__init__(**kwargs)
        self.is_encoder_decoder = True
        # vLLM asks every encoder-decoder config for one, though the processor prepends nothing to the decoder prompt
        self.decoder_start_token_id = self.text_config.pad_token_id or 0
        head_dim = getattr(self.text_config, "head_dim", None) or (
            self.text_config.hidden_size // self.text_config.num_attention_heads
        )
        self.rope_parameters = {"rope_type": "default", "mrope_section": [head_dim // 2, 0, 0]}
        self.serve_self_attn_layers = (
            list(serve_self_attn_layers) if isinstance(serve_self_attn_layers, (list, tuple)) else serve_self_attn_layers
        )


def served_self_attn_layers(config) -> tuple[int, ...]:
    """The deployment's self-attention set S from `serve_self_attn_layers`, read as `visor_hf` reads a fixed budget
    (`VisorConfig.resolve_budget`): a list of layers (one of `config.configurations`, or all `self_attn_layers`), an
    int k (the configuration with k layers) or "full". Checked when the model is built, because vLLM applies
    `hf_overrides` to a config already made; "auto" (the router) is refused."""
    value = getattr(config, "serve_self_attn_layers", ())
    budget = tuple(value) if isinstance(value, (list, tuple)) else value
    try:
        layers = config.resolve_budget(budget)
    except ValueError as error:
        raise ValueError(f"serve_self_attn_layers={value!r}: {error}") from None
    if layers is None:
        raise ValueError("serve_self_attn_layers='auto': the router's per-request choice is not served by vLLM "
                         "(see visor_vllm/README.md); give a fixed budget")
    return tuple(sorted(layers))


def served_token_reduction(config) -> dict | None:
    """The deployment's token reduction in its full form (`visor_hf`'s `validate_token_reduction`), or None. Set it in
    the checkpoint's config or at launch with `hf_overrides={"token_reduction": {"method": "visionzip",
    "keep_ratio": 0.25}}` (vLLM applies overrides to a config already made, so it is validated here)."""
    return validate_token_reduction(getattr(config, "token_reduction", None))


def register_config() -> None:
    """Register `VisorServingConfig` for `model_type="visor"` in vLLM's config registry (a private dict of
    `vllm.transformers_utils.config`)."""
    from vllm.transformers_utils import config as vllm_config

    vllm_config._CONFIG_REGISTRY["visor"] = VisorServingConfig
