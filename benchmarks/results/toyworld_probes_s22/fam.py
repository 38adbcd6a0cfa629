"""Family probes, mixed training from init: python fam.py NAME VARIANT STEPS   VARIANT: inside | above"""
import json, os, random, sys, time
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from visor_hf.toyworld import world, model as tmodel
from visor_hf.toyworld.world import PATCH, _overlaps
name, variant, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
style = world.Style(glyph="6x8", small_digits="one")
orig_sample, orig_render, orig_ask, orig_vocab = world.sample_scene, world.render, world.ask, world.vocabulary
if variant == "inside":
    def sample(rng, canvas=world.CANVAS, style=style):
        while True:
            sc = orig_sample(rng, canvas, style)
            d2 = next(s.label for s in sc.small if s.label)
            for s in sc.small: s.label = None
            L = sc.large
            boxes = [(L.x, L.y, L.x + L.size, L.y + L.size)] + [s.box() for s in sc.small]
            for _ in range(100):
                cx, cy = rng.randrange(canvas // PATCH), rng.randrange(canvas // PATCH)
                cell = (cx * PATCH, cy * PATCH, cx * PATCH + PATCH, cy * PATCH + PATCH)
                if all(not _overlaps(cell, b, 1) for b in boxes):
                    sc.floating = (cx, cy, d2)
                    return sc
    def render(scene, canvas=world.CANVAS, style=style):
        import copy
        s2 = copy.deepcopy(scene); s2.large.label = None
        image = orig_render(s2, canvas, style)
        L = scene.large
        cells = [(int(L.x + L.size / 2) // PATCH, int(L.y + L.size / 2) // PATCH, L.label), scene.floating]
        for cx, cy, digit in cells:
            for dx in range(PATCH):
                for dy in range(PATCH):
                    image.putpixel((cx * PATCH + dx, cy * PATCH + dy), scene.background)
            for dy, r in enumerate(style.digits[digit]):
                for dx, bit in enumerate(r):
                    if bit == "1":
                        image.putpixel((cx * PATCH + style.offset[0] + dx, cy * PATCH + style.offset[1] + dy), (20, 20, 20))
        return image
    def ask(scene, family, rng):
        if family == "number_large":
            return "what is the number on the large shape?", scene.large.label
        return orig_ask(scene, family, rng)
    world.sample_scene, world.render, world.ask = sample, render, ask
if variant == "above":
    def sample(rng, canvas=world.CANVAS, style=style):
        while True:
            sc = orig_sample(rng, canvas, style)
            cy = sc.large.y + sc.large.size / 2
            if all(abs(s.y + s.size / 2 - cy) >= 4 for s in sc.small):
                return sc
    def ask(scene, family, rng):
        if family == "number_large":
            cy = scene.large.y + scene.large.size / 2
            return "how many small shapes are above the large shape?", str(sum(s.y + s.size / 2 < cy for s in scene.small))
        return orig_ask(scene, family, rng)
    def vocabulary(): return sorted(set(orig_vocab()) | {"above"})
    world.sample_scene, world.ask, world.vocabulary, tmodel.vocabulary = sample, ask, vocabulary, vocabulary
out = f"/tmp/s22/{name}"; data = os.path.join(out, "data")
def write(split, n, fams_of):
    os.makedirs(os.path.join(data, split), exist_ok=True)
    with open(os.path.join(data, f"{split}.jsonl"), "w") as f:
        for i in range(n):
            rec, img = world.make_record(split, i, 0, fams_of(i), f"{split}/{i:06d}.png", style)
            img.save(os.path.join(data, rec["image"])); f.write(json.dumps(rec) + "\n")
if not os.path.exists(os.path.join(data, "test.jsonl")):
    write("test", 400, lambda i: [world.FAMILIES[i % 5]])
    write("train", 30000, lambda i: random.Random(f"visor-toyworld/0/train/{i}/families").sample(list(world.FAMILIES), 5))
from visor_hf.toyworld.dense import DenseTrainingOptions, train_dense
t = time.time()
train_dense(data, os.path.join(out, "dense"), DenseTrainingOptions(max_steps=steps, logging_steps=50,
      eval_every=int(os.environ.get("EVERY", "250")), eval_questions=400))
print("train s", time.time() - t, flush=True)
