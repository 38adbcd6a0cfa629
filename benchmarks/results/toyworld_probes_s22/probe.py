"""Mixed-training probe: python probe.py VARIANT STEPS  (variants joined by '+': none, words, aligned)"""
import json, os, sys, time
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from visor_hf.toyworld import world, model as tmodel
variant, steps = sys.argv[1], int(sys.argv[2])
parts = set(variant.split("+"))
style = world.Style(glyph="6x8", small_digits="one")
if "none" in parts:
    orig = world.sample_scene
    def none_scene(rng, canvas=world.CANVAS, style=style):
        sc = orig(rng, canvas, style)
        for s in sc.small: s.label = None
        return sc
    world.sample_scene = none_scene
if "words" in parts:
    NUM = ["zero", "one", "two", "three", "four"]
    orig_ask = world.ask
    def ask(scene, family, rng):
        q, a = orig_ask(scene, family, rng)
        return (q, NUM[int(a)]) if family == "count_left" else (q, a)
    world.ask = ask
    orig_vocab = world.vocabulary
    def vocabulary(): return sorted(set(orig_vocab()) | set(NUM))
    world.vocabulary = vocabulary; tmodel.vocabulary = vocabulary
out = f"/tmp/s22/{variant}"
data = os.path.join(out, "data")
if not os.path.exists(os.path.join(data, "test.jsonl")):
    for split, n, q in (("train", 30000, 5), ("test", 400, 1)):
        os.makedirs(os.path.join(data, split), exist_ok=True)
        with open(os.path.join(data, f"{split}.jsonl"), "w") as f:
            for record, image in world.split_records(split, n, 0, q, world.FAMILIES, style):
                image.save(os.path.join(data, record["image"])); f.write(json.dumps(record) + "\n")
from visor_hf.toyworld.dense import DenseTrainingOptions, train_dense
lr = float(os.environ.get("LR", "5e-4")); bs = int(os.environ.get("BS", "16"))
t = time.time()
log = train_dense(data, os.path.join(out, "dense"), DenseTrainingOptions(max_steps=steps, logging_steps=50, learning_rate=lr,
      batch_size=bs, eval_every=int(os.environ.get("EVERY", "250")), eval_questions=400))
print("train s", time.time() - t, flush=True)
