"""The package's one count of visual tokens (`configuration_visor.num_visual_tokens`) against what transformers'
LLaVA-OneVision makes: the length of each image's packed features from `LlavaOnevisionModel.get_image_features` on a
tiny random model. Covers anyres grids that need unpadding on either axis, grids shrunk by `anyres_max_N`, the
multi-image layout (base crop + newline) and the "default" feature strategy; then the callers of the count
(processor, FLOPs, model card, test helpers, toy world) against the same reference.
"""

import contextlib

import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from visor_hf import VisorConfig
from visor_hf.configuration_visor import num_visual_tokens
from visor_hf.flops import token_reduction_counts
from visor_hf.model_card import TYPICAL_IMAGE, model_card
from visor_hf.testing import IMAGE_TOKEN_ID, num_image_tokens, tiny_llava_onevision, tiny_processor

CROP = 56  # the tiny SigLIP: 56-px crops of 14-px patches, 4 x 4 tokens a crop
PINPOINTS_2x2 = [[CROP * h, CROP * w] for h in (1, 2) for w in (1, 2)]
PINPOINTS_6x6 = [[CROP * h, CROP * w] for h in range(1, 7) for w in range(1, 7)]  # up to 24 x 24 grid tokens

# (height, width): square, wide, tall, odd sizes, unpadding on either axis, larger than every pinpoint
IMAGE_SIZES = [(56, 56), (30, 100), (100, 30), (112, 112), (57, 113), (200, 13), (13, 200), (90, 60), (61, 59),
               (336, 336), (300, 500), (500, 300), (1000, 45), (45, 1000), (250, 170)]
# (pinpoints, vision_aspect_ratio): no shrinking; anyres_max_9 shrinking the 6 x 6 grids; max_1 and max_4 shrinking more
SETTINGS = [(PINPOINTS_2x2, "anyres_max_9"), (PINPOINTS_6x6, "anyres_max_9"), (PINPOINTS_2x2, "anyres_max_1"),
            (PINPOINTS_6x6, "anyres_max_4")]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava_onevision(num_layers=1)  # only the vision tower, projector and packing run here


@contextlib.contextmanager
def settings(llava, pinpoints, aspect_ratio, strategy="full"):
    """The model's config with these anyres settings for the duration of the block."""
    config = llava.config
    saved = config.image_grid_pinpoints, config.vision_aspect_ratio, config.vision_feature_select_strategy
    config.image_grid_pinpoints, config.vision_aspect_ratio, config.vision_feature_select_strategy = (
        pinpoints, aspect_ratio, strategy)
    try:
        yield config
    finally:
        config.image_grid_pinpoints, config.vision_aspect_ratio, config.vision_feature_select_strategy = saved


def transformers_counts(llava, image_sizes, batch_num_images=None) -> list[int]:
    """Tokens per image as transformers' LLaVA-OneVision packs them (the features its forward scatters)."""
    config = llava.config
    crop = config.vision_config.image_size
    single = [True] * len(image_sizes) if batch_num_images is None else [n == 1 for n in batch_num_images for _ in range(n)]
    patches = [image_size_to_num_patches(list(size), config.image_grid_pinpoints, crop) if alone else 1
               for size, alone in zip(image_sizes, single)]
    pixel_values = torch.zeros(len(image_sizes), max(patches), 3, crop, crop)
    extra = {} if batch_num_images is None else {"batch_num_images": torch.tensor(batch_num_images)}
    with torch.no_grad():
        out = llava.model.get_image_features(pixel_values, torch.tensor(image_sizes), **extra)
    features = getattr(out, "pooler_output", out)  # 5.x returns a model output, 4.57 the list
    return [int(f.shape[0]) for f in features]


@pytest.mark.parametrize("pinpoints, aspect_ratio", SETTINGS)
def test_count_of_an_image_alone_matches_llava_onevision(llava, pinpoints, aspect_ratio):
    with settings(llava, pinpoints, aspect_ratio) as config:
        expected = transformers_counts(llava, IMAGE_SIZES)
        got = [num_visual_tokens(config, size) for size in IMAGE_SIZES]
        visor_config = VisorConfig.from_llava_onevision_config(config)
        assert [num_visual_tokens(visor_config, size) for size in IMAGE_SIZES] == got
    assert got == expected, list(zip(IMAGE_SIZES, got, expected))
    if aspect_ratio == "anyres_max_1":  # the grid was shrunk: fewer tokens than the full grid of the pinpoint
        assert min(got) < 16 + 4 * 4 + 4


@pytest.mark.parametrize("strategy", ["full", "default"])
def test_count_of_an_image_among_several_matches_llava_onevision(llava, strategy):
    """A sample with several images: each is its base crop (one token less with "default") plus one newline."""
    sizes = [(30, 100), (90, 60), (336, 336)]
    with settings(llava, PINPOINTS_6x6, "anyres_max_9", strategy) as config:
        expected = transformers_counts(llava, sizes, batch_num_images=[len(sizes)])
        got = [num_visual_tokens(config, size, multi_image=True) for size in sizes]
    assert got == expected == [16 + 1 - (strategy == "default")] * len(sizes)


def image(height, width):
    return Image.new("RGB", (width, height), color=(120, 30, 200))


@pytest.mark.parametrize("pinpoints, aspect_ratio", SETTINGS[1:3])
def test_processor_expands_each_placeholder_to_what_llava_onevision_makes(llava, pinpoints, aspect_ratio):
    sizes = [(57, 113), (1000, 45), (300, 500)]
    with settings(llava, pinpoints, aspect_ratio) as config:
        processor = tiny_processor(config)
        alone = processor(images=[[image(*size)] for size in sizes], text=["<image>"] * len(sizes), return_tensors="pt",
                          padding=True)
        several = processor(images=[[image(*size) for size in sizes]], text=["<image>" * len(sizes)], return_tensors="pt")
        expected_alone = transformers_counts(llava, sizes, batch_num_images=[1] * len(sizes))
        expected_several = transformers_counts(llava, sizes, batch_num_images=[len(sizes)])
    assert (alone["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist() == expected_alone
    assert int((several["input_ids"] == IMAGE_TOKEN_ID).sum()) == sum(expected_several)


def test_callers_take_the_count_from_its_owner(llava):
    """FLOPs, the model card and the test helper count what transformers makes, and so does the toy world."""
    from visor_hf.toyworld import model as toy

    sizes = [(57, 113), (300, 500), (1000, 45), TYPICAL_IMAGE]
    with settings(llava, PINPOINTS_6x6, "anyres_max_9") as config:
        expected = transformers_counts(llava, sizes)
        assert [token_reduction_counts(config, size, None)["num_vision_tokens"] for size in sizes] == expected
        reduced = token_reduction_counts(config, sizes[0], {"method": "visionzip", "keep_ratio": 0.5})
        assert reduced["num_vision_tokens"] == expected[0] > reduced["kept"]
        assert [num_image_tokens(llava, size) for size in sizes] == expected
        card = model_card(VisorConfig.from_llava_onevision_config(config), base_model="tiny")
        assert f"({expected[-1]} visual tokens)" in card

    toy_config = toy.dense_config(toy.ModelSize(text_layers=1))
    toy_llava = LlavaOnevisionForConditionalGeneration(toy_config).eval()
    canvas = toy.CANVAS
    assert [toy.num_visual_tokens()] == transformers_counts(toy_llava, [(canvas, canvas)]) == [16 + 8 * 8 + 8]
