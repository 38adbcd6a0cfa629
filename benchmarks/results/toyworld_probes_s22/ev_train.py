"""Accuracy per family of a dense toy model on 400 of the training images it saw (`make_record` redraws the same
scenes from the seed), one question each, the families in turn: python ev_train.py DENSE_DIR DATA_DIR SEED"""
import json, os, sys, torch
torch.set_num_threads(1)
from visor_hf.toyworld import world
from visor_hf.toyworld.dense import load_dense
from visor_hf.toyworld.evaluate import evaluate, summarise
from visor_hf.training.data import load_records
d, data, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
path = os.path.join(os.path.dirname(os.path.abspath(d)), "train_probe.jsonl")
with open(path, "w") as f:
    for i in range(400):
        rec, _ = world.make_record("train", i, seed, [world.FAMILIES[i % 5]], f"train/{i:06d}.png")
        f.write(json.dumps(rec) + "\n")
model, proc = load_dense(d)
rows = evaluate(model, proc, load_records(path), data)
print("train images:", {k: round(v["accuracy"], 3) for k, v in summarise(rows).items()})
