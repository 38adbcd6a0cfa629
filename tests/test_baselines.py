"""The token-reduction baseline (`visor_hf.baselines.TokenReducedLlavaOnevision`) on multi-image prompts (issue 17).

`generate` reads the inputs as `__call__` does (`batch_num_images` included): a multi-image prompt generates, and the
first generated token's logits are the forward's last logits, in a batch padded by an anyres sample and alone; the
later steps are the forward's on the tokens generated so far (4.57's generate needs help with the positions). The
image placeholders are checked against the images' features.
"""

import pytest
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from visor_hf.baselines import TokenReducedLlavaOnevision
from visor_hf.testing import IMAGE_TOKEN_ID, PAD_TOKEN_ID, tiny_llava_onevision

PRUNING = {"method": "visionzip", "keep_ratio": 0.5}
# sample 0: one anyres image (several crops); sample 1: two images (each its base crop and a newline, as LLaVA-OV
# packs the images of a multi-image prompt)
SAMPLES = [[(56, 112)], [(56, 56), (112, 112)]]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava_onevision(seed=3)


def tokens_per_image(llava, sizes, batch_num_images):
    """What transformers' LLaVA-OneVision makes of each image (its own count, not ours)."""
    crop = llava.config.vision_config.image_size
    pixel_values = torch.zeros(len(sizes), 4, 3, crop, crop)
    with torch.no_grad():
        out = llava.model.get_image_features(
            pixel_values, torch.tensor(sizes), vision_feature_layer=llava.config.vision_feature_layer,
            vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
            batch_num_images=torch.tensor(batch_num_images),
        )
    return [f.shape[0] for f in getattr(out, "pooler_output", out)]


def multi_image_inputs(llava, samples, seed=0):
    """Left-padded LLaVA-OV inputs: per sample, 2 text tokens before each image and 3 after the last."""
    generator = torch.Generator().manual_seed(seed)
    crop, pinpoints = llava.config.vision_config.image_size, llava.config.image_grid_pinpoints
    sizes = [size for sample in samples for size in sample]
    counts = [len(sample) for sample in samples]
    per_image = iter(tokens_per_image(llava, sizes, counts))
    text = lambda n: torch.randint(3, IMAGE_TOKEN_ID, (n,), generator=generator)  # noqa: E731
    rows = []
    for sample in samples:
        parts = [piece for _ in sample for piece in (text(2), torch.full((next(per_image),), IMAGE_TOKEN_ID))]
        rows.append(torch.cat([*parts, text(3)]))
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):], attention_mask[i, length - len(row):] = row, 1
    max_patches = max(image_size_to_num_patches(s, pinpoints, crop) for s in sizes)
    return {
        "input_ids": input_ids, "attention_mask": attention_mask,
        "pixel_values": torch.randn(len(sizes), max_patches, 3, crop, crop, generator=generator),
        "image_sizes": torch.tensor(sizes), "batch_num_images": torch.tensor(counts),
    }


def single(batch, i):
    """Sample i of a left-padded batch alone: its tokens without padding, its images."""
    keep = batch["attention_mask"][i].bool()
    counts = batch["batch_num_images"].tolist()
    images = slice(sum(counts[:i]), sum(counts[: i + 1]))
    return {
        "input_ids": batch["input_ids"][i][keep][None], "attention_mask": batch["attention_mask"][i][keep][None],
        "pixel_values": batch["pixel_values"][images], "image_sizes": batch["image_sizes"][images],
        "batch_num_images": batch["batch_num_images"][i : i + 1],
    }


def first_step_logits(baseline, inputs):
    out = baseline.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=PAD_TOKEN_ID)
    return out.logits[0]


def assert_decoding_is_teacher_forcing(baseline, batch, new_tokens=3):
    """Every step's logits of generate equal the forward's on the prompt plus the tokens generated before it: the
    first step reads the images as the forward does, and each new token takes the position after the last."""
    out = baseline.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=PAD_TOKEN_ID)
    assert out.sequences.shape[1] == new_tokens  # generate from inputs_embeds returns the new tokens only
    fed = out.sequences[:, :-1]
    extended = {**batch, "input_ids": torch.cat([batch["input_ids"], fed], 1),
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(fed)], 1)}
    with torch.no_grad():
        forward = baseline(**extended).logits[:, -new_tokens:]
    for step in range(new_tokens):
        torch.testing.assert_close(out.logits[step], forward[:, step], atol=1e-4, rtol=0, msg=f"step {step}")


@pytest.mark.parametrize("setting", [None, PRUNING], ids=["no-reduction", "visionzip"])
def test_multi_image_generate_starts_from_the_forwards_logits(llava, setting):
    batch = multi_image_inputs(llava, SAMPLES)
    baseline = TokenReducedLlavaOnevision(llava, setting)
    with torch.no_grad():
        forward = baseline(**batch).logits[:, -1]
    torch.testing.assert_close(first_step_logits(baseline, batch), forward, atol=1e-4, rtol=0)
    for i in range(len(SAMPLES)):  # each sample alone: what it gets in the batch padded by the other
        torch.testing.assert_close(first_step_logits(baseline, single(batch, i))[0], forward[i], atol=1e-4, rtol=0)
    assert_decoding_is_teacher_forcing(baseline, batch)
    if setting is None:  # no reduction: exactly transformers' LLaVA-OneVision
        with torch.no_grad():
            torch.testing.assert_close(forward, llava(**batch).logits[:, -1], atol=1e-4, rtol=0)


def test_placeholders_that_do_not_match_the_images_are_an_error(llava):
    baseline = TokenReducedLlavaOnevision(llava, PRUNING)
    batch = multi_image_inputs(llava, SAMPLES)
    truncated = {**batch, "input_ids": batch["input_ids"][:, :-8], "attention_mask": batch["attention_mask"][:, :-8]}
    with pytest.raises(ValueError, match=r"input_ids hold \d+ image placeholder tokens .*the images give \d+ feature "
                                         r"tokens .*expand the placeholders with the processor"):
        baseline.generate(**truncated, max_new_tokens=1, pad_token_id=PAD_TOKEN_ID)
    swapped = {**batch, "input_ids": batch["input_ids"].flip(0), "attention_mask": batch["attention_mask"].flip(0)}
    with pytest.raises(ValueError, match=r"input_ids hold \[34, \d+\] image placeholder tokens per sample, their "
                                         r"images give \[\d+, 34\] \(batch_num_images=\[1, 2\]\)"):
        baseline(**swapped)  # as many placeholders in all, but not where the images are
    with pytest.raises(ValueError, match=r"batch_num_images=\[1, 1, 1\]: expected one count per sample \(2 samples\)"):
        TokenReducedLlavaOnevision(llava, None)(**{**batch, "batch_num_images": torch.tensor([1, 1, 1])})
    no_pixels = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_sizes")}
    with pytest.raises(ValueError, match=r"the images give 0 feature tokens"):
        TokenReducedLlavaOnevision(llava, None)(**no_pixels)
