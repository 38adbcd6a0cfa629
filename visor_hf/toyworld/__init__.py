"""A synthetic easy/hard visual QA world, a small LLaVA-OneVision trained on CPU, and VISOR's whole pipeline on it.

- `world`: the seeded generator (images, coarse and fine-grained questions, LLaVA conversation records).
- `model`: word-level tokenizer, image processor and config of the dense LLaVA-OneVision baseline.
- `dense`: trains the dense baseline with transformers' `Trainer`.
- `evaluate`: accuracy per question kind and FLOPs against dense, for dense and for each VISOR budget.
- `pipeline`: `python -m visor_hf.toyworld run ...`, data -> dense -> convert -> stage1 -> universal -> search ->
  pseudo-label -> router -> evaluate -> report (-> checkpoint).
- `report`: results table, plot, README/BENCHMARKS sections, the checkpoint kept in `toyworld/checkpoint/`.

Usage:
    python -m visor_hf.toyworld run --workdir toy_run --save-checkpoint --write-docs   # about 80 minutes on 2 CPU cores
    python -m visor_hf.demo                                                           # the kept checkpoint
"""
