"""VisorProcessor: LLaVA-OneVision's inputs (checked against transformers' LLaVA-OneVision model), the chat template
with the routing token, saving and loading, and no torchvision."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from visor_hf import VisorForConditionalGeneration, processing_visor
from visor_hf.processing_visor import CHAT_TEMPLATE, ROUTING_TOKEN, VisorProcessor
from visor_hf.testing import (
    IMAGE_TOKEN_ID,
    num_image_tokens,
    tiny_image_processor,
    tiny_llava_onevision,
    tiny_processor,
    tiny_tokenizer,
)

# (height, width): square, wide, tall, odd sizes, sizes that need unpadding on either axis
IMAGE_SIZES = [(56, 56), (30, 100), (100, 30), (112, 112), (57, 113), (200, 13), (13, 200), (90, 60), (61, 59)]


def image(height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def llava():
    return tiny_llava_onevision()


@pytest.fixture(scope="module")
def processor(llava):
    return tiny_processor(llava.config)


@pytest.mark.parametrize("aspect_ratio", ["anyres_max_9", "anyres_max_1"])  # max_1 shrinks the anyres grid
def test_image_tokens_match_what_llava_onevision_makes(llava, aspect_ratio):
    llava.config.vision_aspect_ratio = aspect_ratio
    try:
        processor = tiny_processor(llava.config)
        for height, width in IMAGE_SIZES:
            inputs = processor(images=image(height, width), text="a <image> b", return_tensors="pt")
            count = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
            assert count == num_image_tokens(llava, (height, width)), (aspect_ratio, height, width)
            assert inputs["image_sizes"].tolist() == [[height, width]]
    finally:
        llava.config.vision_aspect_ratio = "anyres_max_9"


def test_processor_inputs_run_llava_onevision_and_visor_identically(llava, processor):
    """A batch of two prompts (left padding) and a sample with two images (multi-image packing)."""
    images = [[image(30, 100)], [image(90, 60, seed=1), image(56, 56, seed=2)]]
    texts = ["Describe <image> now", "<image> and <image>: same?"]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")
    assert inputs["batch_num_images"].tolist() == [1, 2]
    assert int((inputs["input_ids"][1] == IMAGE_TOKEN_ID).sum()) == 2 * (16 + 1)  # base crop + newline each
    visor = VisorForConditionalGeneration.from_llava_onevision(llava, self_attn_layers=list(range(6))).eval()
    with torch.no_grad():
        expected = llava(**inputs).logits  # raises if the image tokens do not match the features
        got = visor(**inputs, budget="full").logits
    text = (inputs["input_ids"] != IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()
    assert (got - expected).abs()[text].max() <= 1e-4


def test_chat_template_is_qwen2_with_the_routing_token_after_each_user_turn(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And its colour?"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\nWhat is it?{ROUTING_TOKEN}<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        f"<|im_start|>user\nAnd its colour?{ROUTING_TOKEN}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    ids = processor(images=image(56, 56), text=text)["input_ids"][0]
    assert ids.count(processor.routing_token_id) == 2 and processor.routing_token_id == 256


def test_apply_chat_template_can_tokenize_images_in_the_messages(processor):
    messages = [{"role": "user", "content": [{"type": "image", "image": image(90, 60)}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert set(inputs) >= {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert int((inputs["input_ids"] == processor.routing_token_id).sum()) == 1


def test_errors_name_the_problem(llava, processor):
    with pytest.raises(ValueError, match="2 '<image>' placeholders for 1 images"):
        processor(images=image(56, 56), text="<image><image>")
    with pytest.raises(ValueError, match="placeholders but no images"):
        processor(text="<image>")
    with pytest.raises(ValueError, match=r"routing_token='<\|visor_route\|>' is not a single token"):
        VisorProcessor(image_processor=tiny_image_processor(llava.config), tokenizer=tiny_tokenizer(), num_image_tokens=16)


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processing_visor.py").is_file()  # the Hub code file travels with the processor
    loaded = VisorProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.routing_token_id, loaded.image_token_id, loaded.num_image_tokens) == (256, IMAGE_TOKEN_ID, 16)
    text = loaded.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
    a = processor(images=image(57, 113), text=text, return_tensors="pt")
    b = loaded(images=image(57, 113), text=text, return_tensors="pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_needs_no_torchvision(processor):
    """The image processor is LLaVA-OneVision's PIL one, never a torchvision backend; where torchvision is not
    installed (CI installs none), every test of this file runs without it."""
    classes = [cls.__name__ for cls in type(processor.image_processor).__mro__]
    assert classes[0] in ("LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorPil")
    assert not any("Torchvision" in name or name.endswith("Fast") for name in classes), classes
    source = (Path(processing_visor.__file__)).read_text()
    assert "import torchvision" not in source and "from torchvision" not in source
