"""Shared fixtures: the real default model (ours and HF transformers' reference), tiny HF folders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Prompts of different lengths (5 to ~110 tokens) generated together in the parity tests.
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The sea is",
    "In 1905, Albert Einstein published four papers that changed physics. The first explained the "
    "photoelectric effect, the second Brownian motion, the third special relativity, and the fourth",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\ndef factorial(n):\n    \"\"\"Return n factorial."
    "\"\"\"\n    if n == 0:\n        return 1\n    return n * factorial(n - 1)\n\n\ndef is_prime(n):\n",
]
NUM_NEW = 24


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels():
    """Build (or load) the C++ CPU kernels before any engine runs, so every test takes the same
    decode-attention path instead of switching when the background build happens to finish."""
    from sarathi.model import kernels

    kernels.start_build(wait=True)
    return kernels.decode_attention()


@pytest.fixture
def one_thread():
    """One torch thread for the real model: two OpenMP threads on a busy 2-core machine crawl (6x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llm():
    """One float32 engine on the default model; tests reconfigure its scheduler as needed."""
    from sarathi import LLM

    return LLM(dtype="float32", kv_cache_memory="256MiB")


@pytest.fixture
def engine(llm):
    """The shared engine, reset to the default sarathi configuration after each test."""
    yield llm.engine
    eng = llm.engine
    eng.abort_request(list(eng.groups))
    assert eng.kv.num_free_blocks == eng.kv.num_blocks, "a test leaked KV blocks"
    eng.reconfigure(scheduler="sarathi", chunk_size=None, max_num_seqs=256, num_kv_blocks=None,
                    max_num_batched_tokens=None, tile_size=None, block_size=16, enable_prefix_caching=True)


@pytest.fixture(scope="session")
def hf_model():
    """HF transformers' model loaded from the same GGUF file (float32)."""
    from transformers import AutoModelForCausalLM

    from sarathi.model.loader import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def hf_reference(llm, hf_model):
    """HF transformers' own greedy continuation of each prompt (manual argmax loop, no processors)."""
    model = hf_model
    tok = llm.get_tokenizer()
    refs = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        refs.append((ids, hf_greedy(model, ids, NUM_NEW)))
    return refs


def hf_greedy(model, ids: list[int], num_new: int, processor=None) -> list[int]:
    """Greedy tokens; ``processor`` (a transformers LogitsProcessor) edits the scores first."""
    out: list[int] = []
    with torch.inference_mode():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(num_new):
            scores = res.logits[:, -1].float()
            if processor is not None:
                scores = processor(torch.tensor([ids + out]), scores)
            tok = int(scores[0].argmax())
            out.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out
