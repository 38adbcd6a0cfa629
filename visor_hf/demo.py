"""Answer a question about an image with VISOR, choosing the budget per question, and show what it cost.

    python -m visor_hf.demo                                   # the toy-world checkpoint in the package, no download
    python -m visor_hf.demo --image scene.png --question "what colour is the large shape?"
    python -m visor_hf.demo --budget 0                        # a fixed budget: auto | full | N self-attention layers
    python -m visor_hf.demo --model ./visor-ov-0.5b --image photo.jpg --question "What is written on the sign?"

Without `--model` it loads `visor_hf/toyworld/checkpoint/` (a few MB, trained on CPU by
`python -m visor_hf.toyworld run`); without `--image` it draws the toy world's demo scene (fixed seed) and,
without `--question`, asks one coarse and one fine-grained question about it, printing the reference answers.
`--model` takes any converted VISOR folder or Hub id (`python -m visor_hf.convert_llava_ov`).

For each question it prints the answer, the configuration of self-attention layers that ran (for
`--budget auto`, the router's choice) and the language model's prefill FLOPs against dense LLaVA-OneVision
on the same tokens (`visor_hf.flops`).
"""

from __future__ import annotations

import argparse
import os

import torch

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toyworld", "checkpoint")


def parse_budget(value: str):
    if value in ("auto", "full"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget {value!r}: use auto, full or a number of self-attention layers") from None


def default_questions():
    """The demo scene's image and two questions about it: (image, [(question, reference answer), ...])."""
    import random

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


@torch.inference_mode()
def answer(model, processor, image, question: str, budget="auto", max_new_tokens: int = 32) -> dict:
    """Generate an answer; return it with the configuration that ran and its FLOPs against dense."""
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
    return {"answer": text, "configuration": configuration, "visor_flops": cost.visor["llm"], "dense_flops": cost.dense["llm"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m visor_hf.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="A VISOR folder or Hub id (default: the toy-world checkpoint).")
    parser.add_argument("--image", help="An image file (default: the toy world's demo scene).")
    parser.add_argument("--question", action="append", help="A question (repeatable; default: two about the demo scene).")
    parser.add_argument("--budget", type=parse_budget, default="auto", help="auto (router), full, or N self-attention layers.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--save-image", metavar="PATH", help="Also write the image used to PATH.")
    args = parser.parse_args(argv)

    from PIL import Image

    image, questions = None, []
    if args.image:
        with Image.open(args.image) as opened:
            image = opened.convert("RGB")
    else:
        image, questions = default_questions()
    if args.question:
        questions = [(q, None) for q in args.question]
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
        print(f"\nQ: {question}")
        print(f"A: {result['answer']}" + (f"   (reference: {reference})" if reference is not None else ""))
        print(f"   configuration: self-attention layers {list(layers)} ({len(layers)} of {len(config.self_attn_layers)}), {how}")
        print(f"   LLM prefill FLOPs: {result['visor_flops'] / 1e6:.2f} M vs {result['dense_flops'] / 1e6:.2f} M dense "
              f"({result['dense_flops'] / result['visor_flops']:.2f}x fewer than dense)")


if __name__ == "__main__":
    main()
