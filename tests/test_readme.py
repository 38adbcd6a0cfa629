"""The README's usage snippet runs as written and prints what it says."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    snippet = next(block for block in blocks if "tiny_llava_onevision()" in block)  # the "Use" section's
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, str(README), "exec"), namespace)
    assert printed.getvalue().strip() == "[(4,)]"  # the comment next to the print in the README
    tokens, inputs = namespace["tokens"], namespace["inputs"]
    assert tokens.shape == (1, inputs["input_ids"].shape[1] + 8)
    cost = namespace["cost"].samples[0]
    assert cost.self_attn_layers == (4,) and cost.llm_ratio > 1.0  # one of two self-attention layers: cheaper
