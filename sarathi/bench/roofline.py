"""Roofline numbers for this machine and FLOP/byte counts for Llama-style models.

``measure_limits`` times dense GEMMs (peak GFLOP/s per dtype) and large memory sweeps
(GB/s) with torch; ``model_flops_per_token`` / ``prefill_flops`` / ``decode_flops`` and
``model_bytes`` / ``kv_cache_bytes`` turn a model shape into the work a forward pass must
do, so a benchmark can report MFU for prefill (compute-bound) and bandwidth utilisation
for decode (memory-bound).

Run ``python -m sarathi.bench.roofline`` to print the measured limits as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama-style decoder that determine its FLOPs and bytes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None
    tied_embeddings: bool = False

    @property
    def hd(self) -> int:
        """Per-head dimension (defaults to hidden / heads)."""
        return self.head_dim or self.hidden // self.heads

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> LlamaShape:
        """Build from an HF ``config.json`` dict (LlamaConfig field names)."""
        return cls(
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            heads=cfg["num_attention_heads"],
            kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            vocab=cfg["vocab_size"],
            head_dim=cfg.get("head_dim"),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


#: SmolLM2-135M, the default model.
SMOLLM2_135M = LlamaShape(576, 1536, 30, 9, 3, 49152, head_dim=64, tied_embeddings=True)


def linear_params_per_layer(m: LlamaShape) -> int:
    """Weights of one layer's matmuls: q, k, v, o projections and the gated MLP."""
    q_o = 2 * m.hidden * m.heads * m.hd
    k_v = 2 * m.hidden * m.kv_heads * m.hd
    mlp = 3 * m.hidden * m.intermediate
    return q_o + k_v + mlp


def param_count(m: LlamaShape) -> int:
    """Total parameters (embeddings counted once when tied; norms included)."""
    norms = m.layers * 2 * m.hidden + m.hidden
    emb = m.vocab * m.hidden * (1 if m.tied_embeddings else 2)
    return m.layers * linear_params_per_layer(m) + norms + emb


def model_flops_per_token(m: LlamaShape, context_len: int = 0, lm_head: bool = True) -> float:
    """FLOPs for one token's forward pass that attends to ``context_len`` tokens.

    Counts 2 FLOPs per multiply-add: all linear layers, attention scores and the weighted
    sum over ``context_len`` positions (QK^T and PV, ``4 * context_len * heads * head_dim``
    per layer), plus the LM head if ``lm_head``. Norms, RoPE and activations are ignored.
    """
    linear = 2 * m.layers * linear_params_per_layer(m)
    attn = 4 * m.layers * context_len * m.heads * m.hd
    head = 2 * m.hidden * m.vocab if lm_head else 0
    return float(linear + attn + head)


def prefill_flops(m: LlamaShape, prompt_len: int, past_len: int = 0, lm_head_tokens: int = 1) -> float:
    """FLOPs to prefill ``prompt_len`` tokens (causal) after ``past_len`` cached tokens.

    Only ``lm_head_tokens`` positions go through the LM head (1 for an engine that only
    samples the last token; ``prompt_len`` for a naive full-logits forward).
    """
    tokens = prompt_len
    linear = 2 * m.layers * linear_params_per_layer(m) * tokens
    # token i (0-based) of the chunk attends to past_len + i + 1 positions.
    attended = tokens * past_len + tokens * (tokens + 1) // 2
    attn = 4 * m.layers * m.heads * m.hd * attended
    head = 2 * m.hidden * m.vocab * lm_head_tokens
    return float(linear + attn + head)


def decode_flops(m: LlamaShape, context_lens: Sequence[int]) -> float:
    """FLOPs of one decode step for a batch whose requests attend to ``context_lens`` tokens."""
    return float(sum(model_flops_per_token(m, c) for c in context_lens))


def model_bytes(m: LlamaShape, dtype: str = "float32", lm_head: bool = True) -> int:
    """Weight bytes one forward step must read: every layer, final norm and the LM head.

    The input embedding is a gather of a few rows and is not counted (with tied
    embeddings the LM head reads that same matrix in full).
    """
    per_layer = linear_params_per_layer(m) + 2 * m.hidden
    weights = m.layers * per_layer + m.hidden + (m.vocab * m.hidden if lm_head else 0)
    return weights * _DTYPE_BYTES[dtype]


def kv_cache_bytes(m: LlamaShape, tokens: int, dtype: str = "float32") -> int:
    """Bytes of K and V for ``tokens`` cached positions across all layers."""
    return 2 * m.layers * m.kv_heads * m.hd * tokens * _DTYPE_BYTES[dtype]


def decode_bytes(m: LlamaShape, context_lens: Sequence[int], dtype: str = "float32") -> int:
    """Minimum bytes read by one decode step: weights once plus each request's KV cache."""
    return model_bytes(m, dtype) + sum(kv_cache_bytes(m, c, dtype) for c in context_lens)


def mfu(flops: float, seconds: float, peak_gflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the measured peak."""
    return flops / seconds / (peak_gflops * 1e9) if seconds > 0 else 0.0


def bandwidth_utilisation(nbytes: float, seconds: float, peak_gbs: float) -> float:
    """Achieved bytes/s over the measured memory bandwidth."""
    return nbytes / seconds / (peak_gbs * 1e9) if seconds > 0 else 0.0


def _best_time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_gemm_gflops(dtype: str = "float32", n: int = 2048, warmup: int = 2, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of an ``n x n x n`` GEMM in ``dtype``: the faster of torch's matmul and
    (on CPUs with oneDNN) oneDNN's linear over a pre-packed weight, which the engine uses. On AMD EPYC
    torch's float32 matmul (MKL) reaches ~190 GFLOP/s where oneDNN reaches ~215: a roofline built on the
    slower one would put real runs above 100%."""
    import torch

    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(torch_dtype)
    b = torch.randn(n, n, generator=gen).to(torch_dtype)
    out = torch.empty(n, n, dtype=torch_dtype)
    best = _best_time(lambda: torch.matmul(a, b, out=out), warmup, repeats)
    if torch.backends.mkldnn.is_available() and torch_dtype in (torch.float32, torch.bfloat16):
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
            linear = torch.ops.mkldnn._linear_pointwise
            best = min(best, _best_time(lambda: linear(a, packed, None, "none", [], ""), warmup, repeats))
        except (RuntimeError, AttributeError):  # a torch without these ops: matmul's number stands
            pass
    return 2 * n**3 / best / 1e9


def measure_bandwidth_gbs(size_mib: int = 512, warmup: int = 1, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth (GB/s) of a large float32 copy (read + write) and sum (read only)."""
    import torch

    numel = size_mib * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    t_copy = _best_time(lambda: dst.copy_(src), warmup, repeats)
    t_sum = _best_time(lambda: src.sum(), warmup, repeats)
    return {"copy": 2 * nbytes / t_copy / 1e9, "sum": nbytes / t_sum / 1e9}


def measure_limits(
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    threads: int | None = None,
    gemm_n: int = 2048,
    bw_size_mib: int = 512,
    repeats: int = 5,
) -> dict[str, Any]:
    """Measure GEMM peaks per dtype and memory bandwidth on this machine.

    Returns ``{"gemm_gflops": {dtype: GFLOP/s}, "mem_bw_gbs": best GB/s, "mem_bw_method":
    "copy"|"sum", "mem_bw_all": {...}, "threads": n, ...}``. ``copy`` counts read + write
    bytes; ``sum`` counts reads only (closer to what decode does: stream weights in).
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    gemm = {dt: measure_gemm_gflops(dt, gemm_n, repeats=repeats) for dt in dtypes}
    bw = measure_bandwidth_gbs(bw_size_mib, repeats=repeats)
    method = max(bw, key=bw.__getitem__)
    return {
        "gemm_gflops": gemm,
        "gemm_n": gemm_n,
        "mem_bw_gbs": bw[method],
        "mem_bw_method": method,
        "mem_bw_all": bw,
        "bw_size_mib": bw_size_mib,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }


def ridge_point(peak_gflops: float, bw_gbs: float) -> float:
    """Arithmetic intensity (FLOP/byte) above which a kernel is compute-bound."""
    return peak_gflops / bw_gbs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure GEMM peak and memory bandwidth; print JSON.")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gemm-n", type=int, default=2048)
    parser.add_argument("--bw-size-mib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    limits = measure_limits(args.dtypes, args.threads, args.gemm_n, args.bw_size_mib, args.repeats)
    m = SMOLLM2_135M
    limits["smollm2_135m"] = {
        "shape": asdict(m),
        "params": param_count(m),
        "flops_per_token_ctx0": model_flops_per_token(m),
        "weight_bytes": {dt: model_bytes(m, dt) for dt in args.dtypes},
        "ridge_flop_per_byte": {
            dt: ridge_point(limits["gemm_gflops"][dt], limits["mem_bw_gbs"]) for dt in args.dtypes
        },
    }
    print(json.dumps(limits, indent=2))


if __name__ == "__main__":
    main()
