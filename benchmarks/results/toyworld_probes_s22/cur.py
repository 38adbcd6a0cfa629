"""Curriculum probe: python cur.py NAME FIRST_STEPS STEPS MODE   MODE: digits | pair  (phase 1 records)"""
import json, os, random, sys, time
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from visor_hf.toyworld import world
name, first_steps, steps, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
style = world.Style(glyph="6x8", small_digits="one")
out = f"/tmp/s22/{name}"; data = os.path.join(out, "data")
src = "/tmp/s22/words/data"  # none of its patches: plain 6x8/one? no -> write our own
os.makedirs(data, exist_ok=True)
def write(split, n, fams_of):
    os.makedirs(os.path.join(data, split), exist_ok=True)
    with open(os.path.join(data, f"{split}.jsonl"), "w") as f:
        for i in range(n):
            rec, img = world.make_record(split, i, 0, fams_of(i), f"{split}/{i:06d}.png", style)
            img.save(os.path.join(data, rec["image"])); f.write(json.dumps(rec) + "\n")
if not os.path.exists(os.path.join(data, "test.jsonl")):
    write("train", 30000, lambda i: random.Random(f"visor-toyworld/0/train/{i}/families").sample(list(world.FAMILIES), 5))
    others = [f for f in world.FAMILIES if f != "number_large"]
    if mode == "digits":
        write("first", 16000, lambda i: ["number_large"])
    else:
        write("first", 16000, lambda i: random.Random(f"first{i}").sample(["number_large", random.Random(f"o{i}").choice(others)], 2))
    write("test", 400, lambda i: [world.FAMILIES[i % 5]])
from visor_hf.toyworld.dense import DenseTrainingOptions, train_dense
t = time.time()
train_dense(data, os.path.join(out, "dense"), DenseTrainingOptions(max_steps=steps, logging_steps=50,
      eval_every=int(os.environ.get("EVERY", "250")), eval_questions=400, first_split="first", first_steps=first_steps))
print("train s", time.time() - t, flush=True)
