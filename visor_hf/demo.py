"""Answer a question about an image with VISOR, choosing the budget per question, and show what it cost.

    python -m visor_hf.demo --save-image scene.png            # the toy-world checkpoint in the package, no download
    python -m visor_hf.demo --image scene.png --question "what colour is the large shape?"
    python -m visor_hf.demo --budget 0                        # a fixed budget: auto | full | N self-attention layers
    python -m visor_hf.demo --list-questions                  # the questions the toy world asks
    python -m visor_hf.demo --model ./visor-ov-0.5b --image photo.jpg --question "What is written on the sign?"

Without `--model` it loads `visor_hf/toyworld/checkpoint/` (a few MB, trained on CPU by
`python -m visor_hf.toyworld run`); without `--image` it draws the toy world's demo scene (fixed seed) and,
without `--question`, asks one coarse and one fine-grained question about it; on that scene it prints the
reference answer of every question the toy world asks. `--model` takes any converted VISOR folder or Hub id
(`python -m visor_hf.convert_llava_ov`).

The toy checkpoint's tokenizer is word-level over the toy world's words (case-sensitive): any other word becomes
`<unk>`. The demo still answers such a question, as a transformers model would, but first warns on stderr naming
the unknown words; `--list-questions` prints the questions the toy world asks. A byte-level BPE tokenizer (a real
checkpoint's) has no unknown words, so the warning never fires there.

For each question it prints the answer, the configuration of self-attention layers that ran (for
`--budget auto`, the router's choice) and the language model's prefill FLOPs against dense LLaVA-OneVision
on the same tokens (`visor_hf.flops`).
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toyworld", "checkpoint")


def parse_budget(value: str):
    if value in ("auto", "full"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget {value!r}: use auto, full or a number of self-attention layers") from None


def toy_questions() -> list[tuple[str, str, str, str]]:
    """(family, kind, question, reference answer about the demo scene) for every question family of the toy world,
    in `world.FAMILIES` order, worded by `world.ask`; kind is "coarse" or "fine" (`world.KIND`)."""
    from .toyworld.world import FAMILIES, KIND, ask, demo_scene

    scene = demo_scene()
    return [(family, KIND[family], *ask(scene, family, random.Random(family))) for family in FAMILIES]


def list_questions() -> str:
    lines = ["The toy world's questions (what the toy checkpoint was trained on; its tokenizer knows only their words):",
             "  coarse: one property of the large shape, visible at low resolution",
             "  fine:   where the small shapes lie against the large one, which needs the visual tokens refined", ""]
    lines += [f"  {kind:<7} {family:<13} {question}" for family, kind, question, _ in toy_questions()]
    return "\n".join(lines)


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of `text` a fast tokenizer (what `from_pretrained` loads) maps to its unknown token, in order, each
    once. Read from the token offsets, so a word is what the tokenizer's own pre-tokenizer split off ("image?" gives
    "image" and "?"). A tokenizer without an unknown token, or a byte-level BPE one (every byte is a token), gives []."""
    if tokenizer.unk_token_id is None:
        return []
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pairs = zip(encoded["input_ids"], encoded["offset_mapping"])
    return list(dict.fromkeys(text[start:end] for token, (start, end) in pairs if token == tokenizer.unk_token_id))


def unknown_words_warning(tokenizer, words: list[str]) -> str:
    lowercase_known = [w.lower() for w in words if w != w.lower() and not unknown_words(tokenizer, w.lower())]
    case = f" (its words are case-sensitive; it knows {', '.join(map(repr, lowercase_known))})" if lowercase_known else ""
    return (f"warning: this model's tokenizer does not know {', '.join(map(repr, words))}{case}; they are read as "
            f"{tokenizer.unk_token}, so the answer cannot use them. The questions the toy world asks: "
            "python -m visor_hf.demo --list-questions")


def default_questions():
    """The demo scene's image and two questions about it: (image, [(question, reference answer), ...])."""
    from .toyworld.world import ask, demo_scene, render

    scene = demo_scene()
    rng = random.Random("visor-toyworld/demo/questions")
    return render(scene), [ask(scene, "colour_large", rng), ask(scene, "count_left", rng)]


def load(model_id: str):
    from .modeling_visor import VisorForConditionalGeneration
    from .processing_visor import VisorProcessor

    if model_id == DEFAULT_MODEL and not os.path.exists(os.path.join(model_id, "config.json")):
        raise SystemExit(f"{model_id} holds no checkpoint; build it with: python -m visor_hf.toyworld run --workdir toy_run --save-checkpoint")
    model = VisorForConditionalGeneration.from_pretrained(model_id).eval()
    return model, VisorProcessor.from_pretrained(model_id)


EMPTY_ANSWER = "(empty: the model ended its answer at once)"


@torch.inference_mode()
def answer(model, processor, image, question: str, budget="auto", max_new_tokens: int = 32) -> dict:
    """Generate an answer; return it with the configuration that ran, its FLOPs against dense and the question's
    words the tokenizer does not know (`unknown_words`; the answer is generated all the same)."""
    from .flops import describe_cost, resolve_configuration

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = dict(processor(images=image, text=prompt, return_tensors="pt"))
    if budget == "auto":
        configuration = tuple(model.route(**inputs)[0])
    else:
        configuration = resolve_configuration(model.config, budget)
    tokens = model.generate(**inputs, budget=budget, max_new_tokens=max_new_tokens, do_sample=False)
    text = processor.tokenizer.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    cost = describe_cost(model, inputs, budget=budget, self_attn_layers=[configuration]).samples[0]
    return {"answer": text, "configuration": configuration, "visor_flops": cost.visor["llm"], "dense_flops": cost.dense["llm"],
            "unknown_words": unknown_words(processor.tokenizer, question)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m visor_hf.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="A VISOR folder or Hub id (default: the toy-world checkpoint).")
    parser.add_argument("--image", help="An image file (default: the toy world's demo scene).")
    parser.add_argument("--question", action="append", help="A question (repeatable; default: two about the demo scene).")
    parser.add_argument("--budget", type=parse_budget, default="auto", help="auto (router), full, or N self-attention layers.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--save-image", metavar="PATH", help="Also write the image used to PATH.")
    parser.add_argument("--list-questions", action="store_true",
                        help="Print the questions the toy world asks (coarse and fine) and exit.")
    args = parser.parse_args(argv)
    if args.list_questions:
        print(list_questions())
        return

    from PIL import Image

    image, questions = None, []
    if args.image:
        with Image.open(args.image) as opened:
            image = opened.convert("RGB")
    else:
        image, questions = default_questions()
    if args.question:
        references = {} if args.image else {question: reference for *_, question, reference in toy_questions()}
        questions = [(q, references.get(q)) for q in args.question]
    elif args.image:
        parser.error("--image needs --question")
    if args.save_image:
        image.save(args.save_image)

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model, processor = load(args.model)
    config = model.config
    name = "toy-world checkpoint" if args.model == DEFAULT_MODEL else args.model
    print(f"model: {name} ({config.num_layers} language-model layers; self-attention layers {config.self_attn_layers}, "
          f"cross-attention after {config.cross_attn_layers})")
    print(f"image: {args.image or 'toy-world demo scene (64 x 64, fixed seed)'}; budget: {args.budget}")
    for question, reference in questions:
        result = answer(model, processor, image, question, args.budget, args.max_new_tokens)
        layers = result["configuration"]
        how = "chosen by the router" if args.budget == "auto" else f"fixed by --budget {args.budget}"
        print(f"\nQ: {question}", flush=True)
        if result["unknown_words"]:
            print(unknown_words_warning(processor.tokenizer, result["unknown_words"]), file=sys.stderr, flush=True)
        print(f"A: {result['answer'] or EMPTY_ANSWER}" + (f"   (reference: {reference})" if reference is not None else "")
              + ("   (from a question with unknown words: see the warning)" if result["unknown_words"] else ""))
        print(f"   configuration: self-attention layers {list(layers)} ({len(layers)} of {len(config.self_attn_layers)}), {how}")
        print(f"   LLM prefill FLOPs: {result['visor_flops'] / 1e6:.2f} M vs {result['dense_flops'] / 1e6:.2f} M dense "
              f"({result['dense_flops'] / result['visor_flops']:.2f}x fewer than dense)")


if __name__ == "__main__":
    main()
