"""VISOR on videos, as LLaVA-OneVision takes them (`pixel_values_videos`: every frame through the tower, pooled 2 x 2,
one newline token after the last frame). A video is one item of the visual stream: its tokens are one sequence for the
CPE, and text after it reads it through cross-attention."""

import pytest
import torch

from visor_hf import VisorForConditionalGeneration
from visor_hf.testing import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VIDEO_TOKEN_ID, tiny_inputs

from .conftest import perturb_new_parameters
from .test_generation import greedy


def video_tokens(llava, frames: int) -> int:
    """Placeholders of one video, from transformers' own LLaVA-OneVision (its features plus the newline)."""
    with torch.no_grad():
        out = llava.model.get_video_features(
            torch.zeros(1, frames, 3, 56, 56), vision_feature_layer=-1, vision_feature_select_strategy="full"
        )
    features = getattr(out, "pooler_output", out)
    return features.shape[1] + (0 if hasattr(out, "pooler_output") else 1)  # 4.57 appends the newline in forward


def video_inputs(llava, samples, seed=0):
    """A left-padded batch; each sample is (text before, frames, text after)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for before, frames, after in samples:
        text = lambda n: torch.randint(3, IMAGE_TOKEN_ID, (n,), generator=generator)
        rows.append(torch.cat([text(before), torch.full((video_tokens(llava, frames),), VIDEO_TOKEN_ID), text(after)]))
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):], attention_mask[i, length - len(row):] = row, 1
    frames = max(f for _, f, _ in samples)
    assert all(f == frames for _, f, _ in samples), "one frame count a batch, as LLaVA-OV's processor pads"
    pixels = torch.randn(len(samples), frames, 3, 56, 56, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values_videos": pixels}


@pytest.mark.parametrize("frames", [1, 8])
def test_full_budget_on_video_is_llava_onevision(llava, frames):
    inputs = video_inputs(llava, [(3, frames, 4), (2, frames, 7)])
    visor = VisorForConditionalGeneration.from_llava_onevision(llava, cross_attn_layers=[1, 3], self_attn_layers=list(range(6))).eval()
    with torch.no_grad():
        expected = llava(**inputs).logits
        got = visor(**inputs, budget="full").logits
    text = (inputs["input_ids"] != VIDEO_TOKEN_ID) & inputs["attention_mask"].bool()
    assert (got - expected).abs()[text].max() <= 1e-4


@pytest.fixture(scope="module")
def video_visor(llava):
    model = VisorForConditionalGeneration.from_llava_onevision(llava, cross_attn_layers=[1, 3, 5], self_attn_layers=[1, 4])
    return perturb_new_parameters(model).eval()


@pytest.mark.parametrize("budget", [0, "full", [0, "full"]])
def test_video_cached_equals_uncached_and_batch_equals_single(llava, video_visor, budget):
    inputs = video_inputs(llava, [(3, 4, 4), (2, 4, 7)])
    cached = greedy(video_visor, inputs, budget, use_cache=True)
    assert torch.equal(cached.sequences, greedy(video_visor, inputs, budget, use_cache=False).sequences)
    budgets = budget if isinstance(budget, list) else [budget] * 2
    for i in range(2):
        keep = inputs["attention_mask"][i].bool()
        alone = {"input_ids": inputs["input_ids"][i:i + 1, keep], "attention_mask": inputs["attention_mask"][i:i + 1, keep],
                 "pixel_values_videos": inputs["pixel_values_videos"][i:i + 1]}
        expected = greedy(video_visor, alone, budgets[i], use_cache=True).sequences[0, keep.sum():]
        assert torch.equal(cached.sequences[i, inputs["input_ids"].shape[1]:], expected)


def test_images_and_videos_in_one_batch_match_llava_onevision(llava):
    """One sample with an image, then a video; LLaVA-OV fills image and video placeholders each from its own pixels."""
    images = tiny_inputs(llava, [(56, 112)], [(3, 2)])
    video = video_inputs(llava, [(0, 2, 3)])
    inputs = {
        "input_ids": torch.cat([images["input_ids"], video["input_ids"]], dim=1),
        "attention_mask": torch.cat([images["attention_mask"], video["attention_mask"]], dim=1),
        "pixel_values": images["pixel_values"], "image_sizes": images["image_sizes"],
        "pixel_values_videos": video["pixel_values_videos"],
    }
    visor = VisorForConditionalGeneration.from_llava_onevision(llava, cross_attn_layers=[], self_attn_layers=list(range(6))).eval()
    with torch.no_grad():
        expected = llava(**inputs).logits
        got = visor(**inputs, budget="full").logits
    text = (inputs["input_ids"] != VIDEO_TOKEN_ID) & (inputs["input_ids"] != IMAGE_TOKEN_ID)
    assert (got - expected).abs()[text].max() <= 1e-4


def test_video_inputs_get_clear_errors(llava, video_visor):
    inputs = video_inputs(llava, [(3, 2, 4)])
    with pytest.raises(ValueError, match="pixel_values_videos is None"):
        video_visor(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"\(videos, frames, channels, height, width\)"):
        video_visor(**dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][0]))
    with pytest.raises(ValueError, match="no video placeholder"):
        video_visor(**dict(inputs, input_ids=inputs["input_ids"].clamp(max=IMAGE_TOKEN_ID - 1)))
    with pytest.raises(ValueError, match="token_reduction applies to images only"):
        video_visor(**inputs, token_reduction={"method": "visionzip", "keep_ratio": 0.5, "score_layer": -1})


# ---- the processor: videos= without torchvision, the chat template's video entries --------------------------------


def frames(count, height=48, width=80, seed=0):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy())
            for _ in range(count)]


@pytest.fixture(scope="module")
def processor(llava):
    from visor_hf.testing import tiny_processor

    return tiny_processor(llava.config)


@pytest.mark.parametrize("count", [1, 32])
def test_processor_takes_videos_and_generate_runs_on_them(llava, video_visor, processor, count):
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what happens?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True).count("<video>\n") == 1
    # (the tiny model has no row for the routing token the chat template adds: the prompt is written out here)
    inputs = processor(videos=[frames(count)], text="<|im_start|>user\n<video>\nwhat happens?<|im_end|>\n", return_tensors="pt")
    assert inputs["pixel_values_videos"].shape == (1, count, 3, 56, 56)
    assert int((inputs["input_ids"] == VIDEO_TOKEN_ID).sum()) == video_tokens(llava, count)  # LLaVA-OV's own count
    out = video_visor.generate(**inputs, budget=0, max_new_tokens=3, do_sample=False, pad_token_id=0,
                               suppress_tokens=[IMAGE_TOKEN_ID, VIDEO_TOKEN_ID])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_a_frame_is_preprocessed_as_the_base_crop_of_an_image(processor):
    """LLaVA-OneVision's video frames are resized to the crop size, rescaled and normalised like an image's base crop
    (the image processor's first patch)."""
    frame = frames(1, 70, 90)[0]
    video = processor(videos=[[frame]], text="<video>", return_tensors="pt")["pixel_values_videos"][0, 0]
    image = processor(images=[frame], text="<image>", return_tensors="pt")["pixel_values"][0, 0]
    torch.testing.assert_close(video, image, atol=1e-5, rtol=0)


def test_mixed_image_and_video_batch_from_the_processor(llava, video_visor, processor):
    texts = ["<image>\nwhat is it?", "<video>\nwhat happens?"]
    inputs = processor(images=[frames(1, 60, 100)[0]], videos=[frames(2)], text=texts, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        together = video_visor(**inputs, budget=[0, "full"]).logits[:, -1]
        image_alone = video_visor(**processor(images=[frames(1, 60, 100)[0]], text=texts[:1], return_tensors="pt"), budget=0).logits[0, -1]
        video_alone = video_visor(**processor(videos=[frames(2)], text=texts[1:], return_tensors="pt"), budget="full").logits[0, -1]
    torch.testing.assert_close(together[0], image_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1], video_alone, atol=1e-5, rtol=0)


def test_processor_video_errors(processor):
    with pytest.raises(ValueError, match="no videos were given"):
        processor(text="<video>")
    with pytest.raises(ValueError, match="one placeholder per video"):
        processor(videos=[frames(2), frames(2)], text="<video>")
    with pytest.raises(ValueError, match="same number of frames"):
        processor(videos=[frames(2), frames(3)], text=["<video>", "<video>"], padding=True)
    assert processor(videos=[], text="hello", return_tensors="pt").keys() == {"input_ids", "attention_mask"}


def test_describe_cost_counts_a_video_as_the_model_runs_it():
    """FLOPs of a video prompt (every frame through the tower, the LLM over the frames' tokens) against
    FlopCounterMode on eager attention, for VISOR and for dense LLaVA-OneVision."""
    from torch.utils.flop_counter import FlopCounterMode

    from visor_hf.flops import describe_cost
    from visor_hf.testing import tiny_llava_onevision

    llava = tiny_llava_onevision(attn_implementation="eager")
    visor = perturb_new_parameters(
        VisorForConditionalGeneration.from_llava_onevision(llava, cross_attn_layers=[1, 3, 5], self_attn_layers=[1, 4])
    ).eval()
    inputs = video_inputs(llava, [(3, 4, 5)])

    def counted(model, **kwargs):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs, logits_to_keep=1, **kwargs)
        return counter.get_total_flops()

    for budget in (0, "full"):
        cost = describe_cost(visor, inputs, budget=budget).samples[0]
        assert cost.num_crops == 4 and cost.num_vision_tokens == video_tokens(llava, 4)
        assert counted(visor, budget=budget) == pytest.approx(cost.visor["total"], rel=1e-3)
    assert counted(llava) == pytest.approx(cost.dense["total"], rel=1e-3)
