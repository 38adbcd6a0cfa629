"""`pipeline("image-text-to-text", model=FOLDER, trust_remote_code=True)` on a saved VISOR folder.

transformers' own pipeline hands unknown call arguments to the processor (5.x; 4.57 drops them for chat inputs), so
`budget` must be taken by VISOR's pipeline class (config.json `custom_pipelines`), which passes it to `generate`.
"""

import pytest
from PIL import Image
from transformers import pipeline

from visor_hf import VisorConfig, VisorForConditionalGeneration, VisorProcessor
from visor_hf.demo import DEFAULT_MODEL

QUESTION = "what colour is the large shape?"
# a layer set the toy checkpoint's search kept (each search picks its own layers)
ONE_LAYER_SET = next(tuple(c) for c in VisorConfig.from_pretrained(DEFAULT_MODEL).configurations if len(c) == 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The toy checkpoint saved with the package's current Hub files (what a user's save/push gives)."""
    path = tmp_path_factory.mktemp("visor_pipeline")
    VisorForConditionalGeneration.from_pretrained(DEFAULT_MODEL).save_pretrained(path)
    VisorProcessor.from_pretrained(DEFAULT_MODEL).save_pretrained(path)
    return str(path)


def chat(image):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def answer_of(output):
    return output[0]["generated_text"][-1]["content"]


@pytest.mark.parametrize("budget", [0, "full", ONE_LAYER_SET])
def test_budget_is_a_call_argument(folder, budget):
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    image = Image.new("RGB", (64, 64), "red")
    got = answer_of(pipe(text=chat(image), budget=budget, max_new_tokens=3))
    expected = answer_of(pipe(text=chat(image), generate_kwargs={"budget": budget}, max_new_tokens=3))
    assert got == expected
    with pytest.raises(ValueError, match="budget"):
        pipe(text=chat(image), budget="bogus", max_new_tokens=3)  # reaches the model: its error, not silence
