from setuptools import find_packages, setup

setup(
    name="visor_hf",
    version="0.1.0",
    description="VISOR (VISion On Request) for LLaVA-OneVision in Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["visor_hf", "visor_hf.*"]),
    # the toy-world checkpoint the demo runs by default, and its results
    package_data={"visor_hf.toyworld": ["checkpoint/*", "results/*"]},
    entry_points={
        "console_scripts": ["visor-convert=visor_hf.convert_llava_ov:main", "visor-train=visor_hf.train:main",
                            "visor-demo=visor_hf.demo:main"],
        # `python -m lmms_eval --model visor ...` (visor_hf/lmms_eval_visor.py)
        "lmms_eval.models": ["visor=visor_hf.lmms_eval_visor:manifest"],
    },
    python_requires=">=3.10",
    # torch is not pinned here: install it first (see README), or pip pulls a multi-GB CUDA build.
    install_requires=[
        "torch>=2.4",
        "transformers>=4.57,<6",
        "accelerate>=1.0",
        "safetensors",
        "huggingface_hub",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "matplotlib", "datasets"],
        "train": ["datasets", "matplotlib"],
        "flash": ["flash-attn>=2.6"],
        # lmms-eval itself goes in with `pip install --no-deps lmms-eval==0.7.3` (its own requirements pull torchvision,
        # wandb, openai, ...); these are the modules it imports to run a generation task on the `visor` model.
        # filelock 4 dropped `filelock._api`, which lmms-eval 0.7.3's evaluator patches.
        "eval": ["loguru", "pytablewriter", "evaluate", "tenacity", "pyyaml", "Jinja2", "sacrebleu", "zstandard", "pytz",
                 "filelock<4", "datasets"],
    },
)
