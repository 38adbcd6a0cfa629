"""Seeded property test of VISOR's equivalences over random tiny configurations.

Each seed draws one case (see `draw_case`): a tiny random LLaVA-OneVision of 2-6 layers (sdpa or eager, anyres_max_9
or anyres_max_1, a pad embedding that is not zero), random cross-attention and self-attention layer sets (sometimes
random `configurations`, sometimes a routing token), VISOR's new parameters moved off their identity init, a batch of
1-3 left-padded samples with 0-2 images each of random sizes (anyres alone, base crop + newline among several), and a
budget per sample or one for the batch (int, "full", a configuration tuple, "auto" when the config has a routing token).
For each case:

1. cached greedy generation == uncached (same tokens, scores within 1e-4); and a cached forward of 1-3 new tokens
   without position_ids == one uncached forward over prompt + new tokens (logits within 1e-4);
2. the batch == each sample alone (the configuration each runs, prefill logits of every text token within 1e-4, and
   greedy generation: same tokens, scores within 1e-4);
3. save_pretrained -> from_pretrained gives the same tensors, config fields and logits (see the test for "same");
4. with every layer a self-attention layer, zero gates (the rest of the new parameters perturbed) and the full budget,
   VISOR's logits on the text positions equal transformers' `LlavaOnevisionForConditionalGeneration` (<= 1e-4, fp32);
5. causality: the logits of a prompt's first p tokens do not change when the prompt is cut after them.

Greedy tokens must be equal, except after a near tie (the two candidates' scores within 1e-4 in the reference run):
from there the sequences may legitimately part, and the comparison stops at that step.

CI runs `DEFAULT_CASES` seeds (well under a minute per transformers line on 2 CPU cores; the tests run on one
intra-op thread, see `one_thread`). A larger run:
    VISOR_FUZZ_CASES=300 pytest tests/test_fuzz.py
Every failure prints the seed and the whole case; replay it with:
    VISOR_FUZZ_SEED=<seed> VISOR_FUZZ_CASES=1 pytest tests/test_fuzz.py
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from visor_hf import VisorForConditionalGeneration
from visor_hf.configuration_visor import num_visual_tokens, spread_subset
from visor_hf.modeling_visor import CACHE_FIELD
from visor_hf.testing import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VIDEO_TOKEN_ID, tiny_llava_onevision

DEFAULT_CASES = 96
NUM_CASES = int(os.environ.get("VISOR_FUZZ_CASES", DEFAULT_CASES))
FIRST_SEED = int(os.environ.get("VISOR_FUZZ_SEED", 0))
SEEDS = range(FIRST_SEED, FIRST_SEED + NUM_CASES)

ROUTING_TOKEN_ID = IMAGE_TOKEN_ID + 1  # a free id of the tiny vocabulary (text tokens are drawn below IMAGE_TOKEN_ID)
ATOL = 1e-4
NEW_TOKENS = 4


# --------------------------------------------------------------------------------------------------
# One random case: everything is drawn from its seed
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    image_sizes: list[tuple[int, int]]  # (H, W) of each image, in order
    segments: list[int]  # text tokens before, between and after the images (len(image_sizes) + 1 entries)
    routing_slots: list[int]  # text segments that end with a routing token
    budget: object


@dataclasses.dataclass
class Case:
    seed: int
    num_layers: int
    attn_implementation: str
    vision_aspect_ratio: str
    cross_attn_layers: list[int]
    self_attn_layers: list[int]
    configurations: list[list[int]] | None  # None: the default (one spread subset per size)
    routing_token_id: int | None
    samples: list[Sample]
    extra_padding: int  # left padding every row gets on top of the longest row's
    pass_batch_num_images: bool
    shared_budget: bool  # one budget for the batch, passed as such (not as a list)

    def __str__(self) -> str:
        fields = dataclasses.asdict(self)
        samples = fields.pop("samples")
        lines = [f"seed={self.seed}: " + ", ".join(f"{k}={v!r}" for k, v in fields.items() if k != "seed")]
        lines += [f"  sample {i}: {s}" for i, s in enumerate(samples)]
        lines.append(f"  replay: VISOR_FUZZ_SEED={self.seed} VISOR_FUZZ_CASES=1 pytest tests/test_fuzz.py")
        return "\n".join(lines)

    @property
    def budgets(self) -> list:
        return [s.budget for s in self.samples]

    @property
    def budget_argument(self):
        """What the batch is called with: the shared budget, or one per sample."""
        return self.samples[0].budget if self.shared_budget else self.budgets


def random_subset(rng: random.Random, items, low: int = 0) -> list[int]:
    items = list(items)
    return sorted(rng.sample(items, rng.randint(low, len(items))))


def draw_case(seed: int) -> Case:
    rng = random.Random(seed)
    num_layers = rng.randint(2, 6)
    layers = range(num_layers)
    self_attn_layers = random_subset(rng, layers, low=1 if rng.random() < 0.9 else 0)
    configurations = None
    if self_attn_layers and rng.random() < 0.3:  # a few random viable subsets instead of one per size
        subsets = {tuple(random_subset(rng, self_attn_layers)) for _ in range(rng.randint(1, 4))}
        configurations = [list(s) for s in sorted(subsets)]
    routing_token_id = ROUTING_TOKEN_ID if rng.random() < 0.5 else None
    viable = [tuple(c) for c in configurations] if configurations else [
        spread_subset(self_attn_layers, k) for k in range(len(self_attn_layers) + 1)  # VisorConfig's default
    ]

    def draw_budget():
        choices = ["full", len(rng.choice(viable)), rng.choice(viable)]
        if routing_token_id is not None:
            choices += ["auto", "auto"]
        return rng.choice(choices)

    samples = []
    for _ in range(rng.randint(1, 3)):
        num_images = rng.choices([0, 1, 2], weights=[1, 2, 2])[0]
        sizes = [(rng.randint(8, 240), rng.randint(8, 240)) for _ in range(num_images)]
        segments = [rng.randint(0, 4)] + [rng.randint(0, 3) for _ in range(num_images - 1)] + [rng.randint(1, 5)]
        if num_images == 0:
            segments = [rng.randint(1, 8)]
        routing_slots = []
        if routing_token_id is not None and rng.random() < 0.8:
            routing_slots = sorted({len(segments) - 1} | ({rng.randrange(len(segments))} if rng.random() < 0.3 else set()))
            routing_slots = [s for s in routing_slots if segments[s] > 0]
        samples.append(Sample(sizes, segments, routing_slots, draw_budget()))
    shared_budget = rng.random() < 0.5  # one budget for the whole batch
    if shared_budget:
        for sample in samples:
            sample.budget = samples[0].budget
    counts = [len(s.image_sizes) for s in samples]
    return Case(
        seed=seed, num_layers=num_layers, attn_implementation=rng.choice(["sdpa", "eager"]),
        vision_aspect_ratio=rng.choice(["anyres_max_9", "anyres_max_9", "anyres_max_1"]),
        cross_attn_layers=random_subset(rng, layers), self_attn_layers=self_attn_layers, configurations=configurations,
        routing_token_id=routing_token_id, samples=samples, extra_padding=rng.choice([0, 0, 1, 2]),
        pass_batch_num_images=max(counts) > 1 or rng.random() < 0.5, shared_budget=shared_budget,
    )


def build_inputs(case: Case, config) -> dict:
    """LLaVA-OneVision inputs of the case's batch: left padding, pixel_values (num_images, max_patches, 3, H, W) with
    anyres crops for an image alone in its sample and the base crop for one of several, batch_num_images."""
    generator = torch.Generator().manual_seed(case.seed)
    crop = config.vision_config.image_size
    rows, pixels, sizes = [], [], []
    for sample in case.samples:
        several = len(sample.image_sizes) > 1
        row = []
        for slot, length in enumerate(sample.segments):
            text = torch.randint(3, IMAGE_TOKEN_ID, (length,), generator=generator)
            if slot in sample.routing_slots:
                text[-1] = case.routing_token_id
            row.append(text)
            if slot < len(sample.image_sizes):
                size = sample.image_sizes[slot]
                row.append(torch.full((num_visual_tokens(config, size, multi_image=several),), IMAGE_TOKEN_ID))
                patches = 1 if several else image_size_to_num_patches(size, config.image_grid_pinpoints, crop)
                pixels.append(torch.randn(patches, 3, crop, crop, generator=generator))
                sizes.append(list(size))
        rows.append(torch.cat(row))
    length = max(len(r) for r in rows) + case.extra_padding
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = row
        attention_mask[i, length - len(row) :] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixels:
        max_patches = max(p.shape[0] for p in pixels)
        inputs["pixel_values"] = torch.stack([torch.cat([p, p.new_zeros(max_patches - len(p), *p.shape[1:])]) for p in pixels])
        inputs["image_sizes"] = torch.tensor(sizes)
        if case.pass_batch_num_images:
            inputs["batch_num_images"] = torch.tensor([len(s.image_sizes) for s in case.samples])
    return inputs


def single(case: Case, inputs: dict, i: int) -> dict:
    """Sample i of the batch alone, without padding and with only its own images."""
    keep = inputs["attention_mask"][i].bool()
    out = {"input_ids": inputs["input_ids"][i : i + 1, keep], "attention_mask": inputs["attention_mask"][i : i + 1, keep]}
    counts = [len(s.image_sizes) for s in case.samples]
    if counts[i]:
        first = sum(counts[:i])
        out["pixel_values"] = inputs["pixel_values"][first : first + counts[i]]
        out["image_sizes"] = inputs["image_sizes"][first : first + counts[i]]
        if "batch_num_images" in inputs:
            out["batch_num_images"] = torch.tensor([counts[i]])
    return out


def text_positions(inputs: dict) -> torch.Tensor:
    return (inputs["input_ids"] != IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()


def perturb(model, seed: int, zero_gates: bool = False):
    """Move VISOR's new parameters off their identity init (gates, CPE, cross-attention, router)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.new_parameters().items():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
            if zero_gates and name.endswith(".gate"):
                param.zero_()
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors are tiny: with two or more intra-op threads on a busy machine OpenMP's spinning costs far more than
    the arithmetic (measured 50x slower on 2 shared cores). Restored afterwards for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Built:
    case: Case
    llava: object
    visor: object
    inputs: dict


@pytest.fixture(scope="module", params=list(SEEDS), ids=lambda seed: f"seed{seed}")
def built(request) -> Built:
    case = draw_case(request.param)
    llava = tiny_llava_onevision(seed=case.seed, num_layers=case.num_layers, attn_implementation=case.attn_implementation)
    llava.config.vision_aspect_ratio = case.vision_aspect_ratio
    with torch.no_grad():  # a pad embedding that is not zero (as in real checkpoints), so that reading padding shows
        embedding = llava.get_input_embeddings().weight
        embedding[PAD_TOKEN_ID] = embedding[PAD_TOKEN_ID + 3]
    overrides = {} if case.routing_token_id is None else {"routing_token_id": case.routing_token_id}
    visor = VisorForConditionalGeneration.from_llava_onevision(
        llava, cross_attn_layers=case.cross_attn_layers, self_attn_layers=case.self_attn_layers,
        configurations=case.configurations, **overrides,
    ).eval()
    assert visor.config.text_config._attn_implementation == case.attn_implementation, case
    assert all(isinstance(b, (int, str)) or list(b) in visor.config.configurations for b in case.budgets), case
    perturb(visor, case.seed)
    return Built(case, llava, visor, build_inputs(case, llava.config))


# --------------------------------------------------------------------------------------------------
# Comparisons that say what differs, for which case
# --------------------------------------------------------------------------------------------------


def greedy(model, inputs, budget, use_cache: bool):
    # The image placeholder and the routing token may only appear in the prompt: never generate them.
    return model.generate(
        **inputs, budget=budget, use_cache=use_cache, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=PAD_TOKEN_ID,
        suppress_tokens=[IMAGE_TOKEN_ID, ROUTING_TOKEN_ID, VIDEO_TOKEN_ID],
    )


def compare_generations(got_tokens, got_scores, ref_tokens, ref_scores, what: str, case: Case):
    """Same greedy tokens (up to a near tie in the reference's scores, after which the runs may part) and the same
    scores (within ATOL) up to there. got/ref_tokens: (T,); *_scores: T tensors (V,)."""
    for step, (got, ref) in enumerate(zip(got_tokens.tolist(), ref_tokens.tolist())):
        got_step, ref_step = got_scores[step], ref_scores[step]
        assert torch.equal(got_step.isinf(), ref_step.isinf()), f"{what}: -inf pattern differs at step {step}\n{case}"
        finite = ref_step.isfinite()
        error = float((got_step - ref_step)[finite].abs().max())
        assert error <= ATOL, f"{what}: scores differ by {error:.3g} at step {step}\n{case}"
        if got != ref:
            gap = float((ref_step[ref] - ref_step[got]).abs())
            assert gap <= ATOL, (
                f"{what}: token {got} instead of {ref} at step {step} (reference scores apart by {gap:.3g}, no tie)\n{case}"
            )
            return  # a near tie: the sequences may part from here


# --------------------------------------------------------------------------------------------------
# The equivalences
# --------------------------------------------------------------------------------------------------


def test_cached_generation_equals_uncached(built):
    case, visor, inputs = built.case, built.visor, built.inputs
    cached = greedy(visor, inputs, case.budget_argument, use_cache=True)
    uncached = greedy(visor, inputs, case.budget_argument, use_cache=False)
    prompt_length = inputs["input_ids"].shape[1]
    for i in range(len(case.samples)):
        compare_generations(
            cached.sequences[i, prompt_length:], [s[i] for s in cached.scores],
            uncached.sequences[i, prompt_length:], [s[i] for s in uncached.scores],
            f"sample {i}: cached vs uncached generation", case,
        )


def test_cached_steps_equal_one_uncached_forward(built):
    """A forward over the prompt with the cache, then 1-3 new tokens at once from the cache with no position_ids (the
    model's own positions, a path generate does not take), give the logits of one uncached forward over it all."""
    case, visor, inputs = built.case, built.visor, built.inputs
    generator = torch.Generator().manual_seed(case.seed)
    num_new = 1 + case.seed % 3
    new = torch.randint(3, IMAGE_TOKEN_ID, (len(case.samples), num_new), generator=generator)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
    with torch.no_grad():
        prompt = visor(**inputs, budget=case.budget_argument, use_cache=True)
        cache = prompt.past_key_values if prompt.past_key_values is not None else prompt.cache
        step = visor(input_ids=new, attention_mask=mask, use_cache=True, **{CACHE_FIELD: cache})
        whole = visor(**{**inputs, "input_ids": torch.cat([inputs["input_ids"], new], 1), "attention_mask": mask},
                      budget=case.budget_argument)
    assert whole.self_attn_layers == prompt.self_attn_layers, case
    error = float((step.logits - whole.logits[:, -num_new:]).abs().max())
    assert error <= ATOL, f"{num_new} cached new tokens vs one uncached forward: logits differ by {error:.3g}\n{case}"


def test_batch_equals_each_sample_alone(built):
    case, visor, inputs = built.case, built.visor, built.inputs
    with torch.no_grad():
        together = visor(**inputs, budget=case.budget_argument)
    generated = greedy(visor, inputs, case.budget_argument, use_cache=True)
    prompt_length = inputs["input_ids"].shape[1]
    for i, sample in enumerate(case.samples):
        alone_inputs = single(case, inputs, i)
        with torch.no_grad():
            alone = visor(**alone_inputs, budget=sample.budget)
        assert alone.self_attn_layers[0] == together.self_attn_layers[i], (
            f"sample {i} runs {alone.self_attn_layers[0]} alone, {together.self_attn_layers[i]} in the batch\n{case}"
        )
        batch_logits = together.logits[i, text_positions(inputs)[i]]
        alone_logits = alone.logits[0, text_positions(alone_inputs)[0]]
        error = float((batch_logits - alone_logits).abs().max())
        assert error <= ATOL, f"sample {i}: prefill logits in the batch and alone differ by {error:.3g}\n{case}"
        alone_generated = greedy(visor, alone_inputs, sample.budget, use_cache=True)
        compare_generations(
            generated.sequences[i, prompt_length:], [s[i] for s in generated.scores],
            alone_generated.sequences[0, alone_inputs["input_ids"].shape[1] :], [s[0] for s in alone_generated.scores],
            f"sample {i}: batch vs alone generation", case,
        )


def test_save_then_load_gives_identical_logits(built, tmp_path):
    """Every tensor and VISOR's config fields come back bit for bit, and so do the logits. safetensors memory-maps the
    file, so the loaded weights sit at arbitrary offsets, and CPU BLAS kernels round differently on unaligned operands
    (up to ~2e-7 on a few cases in 300): as loaded, the logits agree to 1e-6; with the weights moved to freshly
    allocated memory, exactly."""
    case, visor, inputs = built.case, built.visor, built.inputs
    visor.save_pretrained(tmp_path)
    loaded = VisorForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=case.attn_implementation).eval()
    assert loaded.config.text_config._attn_implementation == case.attn_implementation, case
    for field in ("cross_attn_layers", "self_attn_layers", "configurations", "routing_token_id", "default_budget",
                  "cpe_kernel_size", "router_hidden_size", "vision_aspect_ratio", "image_grid_pinpoints"):
        assert getattr(loaded.config, field) == getattr(visor.config, field), f"config.{field} after loading\n{case}"
    saved, restored = visor.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys(), f"state dict keys {sorted(saved.keys() ^ restored.keys())}\n{case}"
    changed = [key for key in saved if not torch.equal(saved[key], restored[key])]
    assert not changed, f"saved then loaded: tensors changed {changed[:5]}\n{case}"
    with torch.no_grad():
        before = visor(**inputs, budget=case.budget_argument)
        as_loaded = loaded(**inputs, budget=case.budget_argument)
        for param in loaded.parameters():  # tied weights are one Parameter: the tie holds
            param.data = param.data.clone()
        after = loaded(**inputs, budget=case.budget_argument)
    assert after.self_attn_layers == before.self_attn_layers, case
    error = float((as_loaded.logits - before.logits).abs().max())
    assert error <= 1e-6, f"saved then loaded: logits differ by {error:.3g}\n{case}"
    assert torch.equal(after.logits, before.logits), (
        f"saved then loaded (weights realigned): logits differ by {float((after.logits - before.logits).abs().max()):.3g}"
        f"\n{case}"
    )


def test_full_budget_with_every_layer_equals_llava_onevision(built):
    """Every layer a self-attention layer, the case's cross-attention layers with zero gates (CPE, projections and
    router perturbed): at the full budget VISOR is LLaVA-OneVision."""
    case, llava, inputs = built.case, built.llava, built.inputs
    visor = VisorForConditionalGeneration.from_llava_onevision(
        llava, cross_attn_layers=case.cross_attn_layers, self_attn_layers=list(range(case.num_layers))
    ).eval()
    perturb(visor, case.seed, zero_gates=True)
    with torch.no_grad():
        expected = llava(**inputs).logits
        got = visor(**inputs, budget="full")
    assert got.self_attn_layers == [tuple(range(case.num_layers))] * len(case.samples), case
    error = float((got.logits - expected).abs()[text_positions(inputs)].max())
    assert error <= ATOL, f"full budget vs LLaVA-OneVision: logits differ by {error:.3g}\n{case}"


def prefix_cut(case: Case, i: int, alone: dict) -> int | None:
    """A prefix length of sample i (alone) that ends on a text token and keeps either none of its images or all of
    them (a prefix that dropped one of two images would pack the other differently); None if there is none."""
    ids = alone["input_ids"][0]
    image = torch.nonzero(ids == IMAGE_TOKEN_ID).flatten().tolist()
    if image:
        cuts = list(range(1, image[0] + 1)) + list(range(image[-1] + 2, len(ids)))
    else:
        cuts = list(range(1, len(ids)))
    return random.Random(case.seed * 10 + i).choice(cuts) if cuts else None


def test_prefix_logits_do_not_depend_on_what_follows(built):
    """Causality, the dense model's order: the logits of a prompt's first p tokens are those of the prompt cut after
    them (text before an image does not read it, through self- or cross-attention). The configuration the whole
    prompt ran is fixed for both, so the router's choice does not enter."""
    case, visor, inputs = built.case, built.visor, built.inputs
    for i in range(len(case.samples)):
        alone = single(case, inputs, i)
        cut = prefix_cut(case, i, alone)
        if cut is None:
            continue
        prefix = {"input_ids": alone["input_ids"][:, :cut], "attention_mask": alone["attention_mask"][:, :cut]}
        if bool((prefix["input_ids"] == IMAGE_TOKEN_ID).any()):
            prefix.update({k: v for k, v in alone.items() if k not in prefix})
        with torch.no_grad():
            whole = visor(**alone, budget=case.samples[i].budget)
            part = visor(**prefix, budget=whole.self_attn_layers[0])
        text = text_positions(prefix)[0]
        error = float((whole.logits[0, :cut][text] - part.logits[0][text]).abs().max())
        assert error <= ATOL, f"sample {i}: logits of its first {cut} tokens change with what follows by {error:.3g}\n{case}"


def test_ci_seeds_cover_every_kind_of_case():
    """The CI-sized run (seeds 0..DEFAULT_CASES-1) draws each feature at least once: a change to `draw_case` that
    loses one shows here, not as a silently narrower fuzz."""
    cases = [draw_case(seed) for seed in range(DEFAULT_CASES)]
    images = lambda case: [len(s.image_sizes) for s in case.samples]
    features = {
        **{f"{n} layers": lambda c, n=n: c.num_layers == n for n in range(2, 7)},
        **{f"batch of {n}": lambda c, n=n: len(c.samples) == n for n in range(1, 4)},
        "sdpa": lambda c: c.attn_implementation == "sdpa",
        "eager": lambda c: c.attn_implementation == "eager",
        "anyres_max_1": lambda c: c.vision_aspect_ratio == "anyres_max_1",
        "random configurations": lambda c: c.configurations is not None,
        "no cross-attention layer": lambda c: not c.cross_attn_layers,
        "budget auto": lambda c: "auto" in c.budgets,
        "routing token before the last": lambda c: any(len(s.routing_slots) > 1 for s in c.samples),
        "int budget": lambda c: any(type(b) is int for b in c.budgets),
        "tuple budget": lambda c: any(isinstance(b, tuple) for b in c.budgets),
        "budget full": lambda c: "full" in c.budgets,
        "mixed budgets": lambda c: len({repr(b) for b in c.budgets}) > 1,
        "two images in a sample": lambda c: 2 in images(c),
        "text-only sample beside images": lambda c: 0 in images(c) and max(images(c)) > 0,
        "image first in a sample": lambda c: any(s.image_sizes and s.segments[0] == 0 for s in c.samples),
        "extra left padding": lambda c: c.extra_padding > 0,
        "no batch_num_images": lambda c: not c.pass_batch_num_images and max(images(c)) > 0,
    }
    missing = [name for name, has in features.items() if not any(has(c) for c in cases)]
    assert not missing, f"the CI seeds never draw: {missing}"
