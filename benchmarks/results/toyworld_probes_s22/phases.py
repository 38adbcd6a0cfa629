"""Multi-phase probe: python phases.py NAME WORLD PHASES   WORLD: under|free   PHASES: mixed:1000,digits:500,mixed:1000"""
import json, os, random, sys, time
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from visor_hf.toyworld import world
from visor_hf.toyworld.world import Shape, PATCH, _overlaps
name, wname, phases = sys.argv[1], sys.argv[2], [(p.split(":")[0], int(p.split(":")[1])) for p in sys.argv[3].split(",")]
style = world.Style(glyph="6x8", small_digits="one")
if wname == "free":
    orig = world.sample_scene
    def free_scene(rng, canvas=world.CANVAS, style=style):
        while True:
            sc = orig(rng, canvas, style)
            digit = next(s.label for s in sc.small if s.label)
            for s in sc.small: s.label = None
            boxes = [sc.large.box()] + [s.box() for s in sc.small]
            for _ in range(100):
                cx, cy = rng.randrange(canvas // PATCH), rng.randrange(canvas // PATCH)
                cell = (cx * PATCH, cy * PATCH, cx * PATCH + PATCH, cy * PATCH + PATCH)
                above = (cx * PATCH, cy * PATCH - PATCH, cx * PATCH + PATCH, cy * PATCH)
                if all(not _overlaps(cell, b, 1) for b in boxes) and all(not _overlaps(above, b, 0) for b in boxes[:1]):
                    # a floating digit: drawn as a 0-size "shape" whose label patch is (cx, cy)
                    sc.small.append(Shape("red", "square", cx * PATCH + 3, cy * PATCH - 1, 0, digit))
                    return sc
    world.sample_scene = free_scene
    orig_render = world.render
    def render(scene, canvas=world.CANVAS, style=style):
        floating = [s for s in scene.small if s.size == 0]
        scene2 = world.Scene(scene.large, [s for s in scene.small if s.size > 0], scene.background, scene.tints)
        image = orig_render(scene2, canvas, style)
        for shape in floating:
            column, row = shape.label_patch()
            left, top = column * PATCH + style.offset[0], row * PATCH + style.offset[1]
            for dy, r in enumerate(style.digits[shape.label]):
                for dx, bit in enumerate(r):
                    if bit == "1":
                        image.putpixel((left + dx, top + dy), (20, 20, 20))
        return image
    world.render = render
out = f"/tmp/s22/{name}"; data = os.path.join(out, "data")
def write(split, n, fams_of):
    os.makedirs(os.path.join(data, split), exist_ok=True)
    with open(os.path.join(data, f"{split}.jsonl"), "w") as f:
        for i in range(n):
            rec, img = world.make_record(split, i, 0, fams_of(i), f"{split}/{i:06d}.png", style)
            img.save(os.path.join(data, rec["image"])); f.write(json.dumps(rec) + "\n")
if not os.path.exists(os.path.join(data, "test.jsonl")):
    write("mixed", 30000, lambda i: random.Random(f"visor-toyworld/0/train/{i}/families").sample(list(world.FAMILIES), 5))
    write("digits", 16000, lambda i: ["number_large"])
    write("test", 400, lambda i: [world.FAMILIES[i % 5]])
from transformers import LlavaOnevisionForConditionalGeneration, Trainer, TrainingArguments
from visor_hf.training.data import load_records
from visor_hf.toyworld.dense import DenseCollator, LearningCurve
from visor_hf.toyworld.model import ModelSize, build_tokenizer, dense_config, dense_processor, image_processor
torch.manual_seed(0)
config = dense_config(ModelSize()); model = LlavaOnevisionForConditionalGeneration(config)
processor = dense_processor(build_tokenizer(), image_processor(config))
test = load_records(os.path.join(data, "test.jsonl"))
curve = LearningCurve(processor, test, data, int(os.environ.get("EVERY", "250")))
lr = float(os.environ.get("LR", "5e-4"))
for split, steps in phases:
    args = TrainingArguments(output_dir=os.path.join(out, "trainer"), max_steps=steps, per_device_train_batch_size=16,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=100, weight_decay=0.1, logging_steps=50,
        save_strategy="no", report_to="none", remove_unused_columns=False, seed=0, use_cpu=True, disable_tqdm=True)
    print("phase", split, steps, flush=True)
    Trainer(model=model, args=args, train_dataset=load_records(os.path.join(data, f"{split}.jsonl")),
            data_collator=DenseCollator(processor, image_folder=data), callbacks=[curve]).train()
model.save_pretrained(os.path.join(out, "model"))
