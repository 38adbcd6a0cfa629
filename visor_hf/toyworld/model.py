"""The toy world's dense LLaVA-OneVision: word-level tokenizer, image processor, model config, processors.

The dense baseline is transformers' own `LlavaOnevisionForConditionalGeneration`, randomly initialised:

- vision tower: a SigLIP on 32-px crops of 8-px patches (16 tokens a crop), as weak as it gets on purpose:
  LLaVA-OneVision takes its features at `vision_feature_layer=-2` of a one-layer SigLIP: the patch + position
  embeddings, before any encoder layer (transformers' SigLIP needs at least one layer; it runs, and its output
  is not used). Each
  visual token so describes one 8 x 8 patch and nothing else, and every relation between patches (what lies
  left of or above what) has to be worked out by the language model's layers
  refining the visual tokens: what VISOR's self-attention layers keep and its cross-attention-only budget drops.
- anyres: a 64 x 64 image becomes the 32-px base view plus a 2 x 2 grid of full-resolution crops: 16 + 64
  tokens plus 8 row-newline tokens = 88 visual tokens.
- language model: a Qwen2 of `text_layers` layers (hidden 128, 4 heads, 2 key/value heads), tied embeddings.
- tokenizer: word-level over `world.vocabulary()` plus Qwen2's chat tokens, so that every answer is one token.
  Its files are written by hand (not by the running transformers), so that both 4.57 and 5.x read them.

`dense_processor` is a `VisorProcessor` whose chat template has no routing token: the dense model is trained
and evaluated on exactly the prompt LLaVA-OneVision would see. After conversion, the VISOR processor adds the
routing token after each question (`processing_visor.CHAT_TEMPLATE`).

Usage:
    tokenizer = build_tokenizer(); config = dense_config(tokenizer)
    model = LlavaOnevisionForConditionalGeneration(config)
    processor = dense_processor(tokenizer, image_processor(config))
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

import transformers
from transformers import LlavaOnevisionConfig

from ..configuration_visor import num_visual_tokens as count_visual_tokens
from ..processing_visor import CHAT_TEMPLATE, IMAGE_TOKEN, ROUTING_TOKEN, VisorProcessor
from .world import CANVAS, vocabulary

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<unk>", IMAGE_TOKEN]
PAD, EOS, UNK = "<|endoftext|>", "<|im_end|>", "<unk>"
CROP, PATCH = 32, 8
# The dense prompt: Qwen2's template as VISOR's processor renders it, without the routing token.
DENSE_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(ROUTING_TOKEN, "")
# Words: runs of letters, single digits, newlines and single punctuation marks; spaces are dropped.
PRE_TOKENIZER_PATTERN = r"\n|[A-Za-z]+|\d|[^\sA-Za-z\d]"


@dataclass
class ModelSize:
    """Sizes of the dense model (the `full` preset is the trained checkpoint's; `ci` is the test's)."""

    vision_hidden: int = 128
    vision_layers: int = 1
    # -2 with one layer: SigLIP's patch + position embeddings, before any encoder layer (the same hidden state as 0,
    # which transformers 5.24's LLaVA-OneVision mistakes for "no layer given")
    vision_feature_layer: int = -2
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 384


def vocab() -> dict[str, int]:
    tokens = SPECIAL_TOKENS + ["\n"] + vocabulary()
    return {token: i for i, token in enumerate(tokens)}


def backend_tokenizer():
    """A `tokenizers.Tokenizer`: word level, the chat and image tokens as special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab=vocab(), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated"),
    ])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return backend


def save_tokenizer(directory: str) -> None:
    """tokenizer.json (from the `tokenizers` library) and a hand-written tokenizer_config.json that
    transformers 4.57 and 5.x both load as a `PreTrainedTokenizerFast`."""
    os.makedirs(directory, exist_ok=True)
    backend = backend_tokenizer()
    backend.save(os.path.join(directory, "tokenizer.json"))
    ids = vocab()
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "pad_token": PAD, "eos_token": EOS, "unk_token": UNK,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                          "special": True}
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": [],
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump({"pad_token": PAD, "eos_token": EOS, "unk_token": UNK, "additional_special_tokens": []}, f, indent=2)


def build_tokenizer():
    """The word-level tokenizer as a `PreTrainedTokenizerFast` (in memory)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend_tokenizer(), pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def dense_config(size: ModelSize | None = None, attn_implementation: str = "sdpa") -> LlavaOnevisionConfig:
    size = size or ModelSize()
    ids = vocab()
    vocab_size = -(-(len(ids) + 1) // 8) * 8  # a spare row for the routing token, as Qwen2 has
    text_config = dict(
        model_type="qwen2", vocab_size=vocab_size, hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads, num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=ids[PAD],
        eos_token_id=ids[EOS], bos_token_id=None, initializer_range=0.02,
    )
    vision_config = dict(
        model_type="siglip_vision_model", hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers, num_attention_heads=2, image_size=CROP, patch_size=PATCH,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=ids[IMAGE_TOKEN],
        image_grid_pinpoints=[[CROP * h, CROP * w] for h in (1, 2) for w in (1, 2)],
        vision_feature_layer=size.vision_feature_layer,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True,
    )
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn_implementation
    return config


def image_processor(config=None):
    """LLaVA-OneVision's PIL image processor for 32-px crops and the 2 x 2 anyres grid."""
    cls = getattr(transformers, "LlavaOnevisionImageProcessorPil", None) or transformers.LlavaOnevisionImageProcessor
    pinpoints = config.image_grid_pinpoints if config is not None else [[CROP * h, CROP * w] for h in (1, 2) for w in (1, 2)]
    return cls(size={"height": CROP, "width": CROP}, image_grid_pinpoints=pinpoints,
               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def dense_processor(tokenizer, processor_of_images) -> VisorProcessor:
    """A processor for the dense model: LLaVA-OneVision's inputs, Qwen2's chat template, no routing token.

    `VisorProcessor` insists on a routing token in its tokenizer; a copy of the tokenizer gets one in memory
    (at an id the dense model never sees), and the chat template never emits it."""
    tokenizer = copy.deepcopy(tokenizer)
    if ROUTING_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [ROUTING_TOKEN]})
    return VisorProcessor(
        image_processor=processor_of_images, tokenizer=tokenizer, num_image_tokens=(CROP // PATCH) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=DENSE_CHAT_TEMPLATE,
    )


def num_visual_tokens() -> int:
    """Visual tokens of one toy-world image (CANVAS x CANVAS pixels): 88, asked of the package's one count."""
    return count_visual_tokens(dense_config(), (CANVAS, CANVAS))
