"""Request lengths and arrivals for simulations.

Paper-scale workloads hold millions of prompt tokens, so the simulator works with lengths, not token
ids: every prompt is the same id repeated (the cost model reads only lengths and positions). The
length distributions and arrival processes are the benchmarks' (:mod:`sarathi.bench.workloads`), plus
the SARATHI paper's Zipf lengths for its GPT-3 experiment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sarathi.bench import workloads as bw

KINDS = ("fixed", "ranged", "sharegpt", "zipf", "file")


@dataclass
class SimRequest:
    prompt_len: int
    max_tokens: int
    arrival_time: float = 0.0
    prompt_token_ids: list[int] | None = None  # only when read from a workload file


def fixed(P: int, D: int, n: int) -> list[SimRequest]:
    return [SimRequest(P, D) for _ in range(n)]


def ranged(p_range: tuple[int, int], d_range: tuple[int, int], n: int, seed: int = 0) -> list[SimRequest]:
    """Uniform lengths in inclusive ranges (the same draws as ``bench.workloads.ranged``)."""
    rng = np.random.default_rng(seed)
    ps = rng.integers(p_range[0], p_range[1] + 1, size=n)
    ds = rng.integers(d_range[0], d_range[1] + 1, size=n)
    return [SimRequest(int(p), int(d)) for p, d in zip(ps, ds, strict=True)]


def sharegpt(n: int, seed: int = 0, max_len: int = 4096, scale: float = 1.0, min_prompt_len: int = 4,
             ) -> list[SimRequest]:
    """ShareGPT4-like lognormal lengths (the same draws as ``bench.workloads.sharegpt_like``; scale 1
    keeps the real lengths: prompts median 1730, outputs median 415)."""
    rng = np.random.default_rng(seed)
    p_mu, p_sigma = bw.lognormal_params(bw.SHAREGPT4_PROMPT_MEDIAN, bw.SHAREGPT4_PROMPT_P90)
    d_mu, d_sigma = bw.lognormal_params(bw.SHAREGPT4_OUTPUT_MEDIAN, bw.SHAREGPT4_OUTPUT_P90)
    p_raw = rng.lognormal(p_mu, p_sigma, size=n) * scale
    d_raw = rng.lognormal(d_mu, d_sigma, size=n) * scale
    ds = np.clip(np.rint(d_raw), 1, max_len - min_prompt_len).astype(int)
    ps = np.clip(np.rint(p_raw), min_prompt_len, max_len - ds).astype(int)
    return [SimRequest(int(p), int(d)) for p, d in zip(ps, ds, strict=True)]


def zipf(n: int, lo: int, hi: int, pd_ratio: float, theta: float = 0.4, seed: int = 0) -> list[SimRequest]:
    """Total lengths in ``[lo, hi]`` with P(L) proportional to ``rank^-theta`` (shorter lengths more
    likely), split into prompt and output at ``P:D = pd_ratio`` (the paper's GPT-3 setup: 1K-4K,
    Zipf 0.4, P:D 10)."""
    rng = np.random.default_rng(seed)
    lengths = np.arange(lo, hi + 1)
    w = (lengths - lo + 1.0) ** -theta
    total = rng.choice(lengths, size=n, p=w / w.sum())
    out = []
    for L in total.tolist():
        d = max(1, round(L / (pd_ratio + 1)))
        out.append(SimRequest(max(1, L - d), d))
    return out


def from_file(path: str) -> list[SimRequest]:
    return [SimRequest(r.prompt_len, r.max_tokens, r.arrival_time, r.prompt_token_ids)
            for r in bw.load_workload(path)]


def with_arrivals(reqs: Sequence[SimRequest], qps: float, cv: float = 1.0, seed: int = 0) -> list[SimRequest]:
    """Poisson (``cv = 1``) or gamma arrivals at ``qps`` requests/s; ``qps = inf``: all at t = 0."""
    times = bw.gamma_arrivals(qps, cv, len(reqs), seed) if not math.isinf(qps) else [0.0] * len(reqs)
    return [SimRequest(r.prompt_len, r.max_tokens, t, r.prompt_token_ids) for r, t in zip(reqs, times)]


def summarize(reqs: Sequence[SimRequest]) -> dict[str, float]:
    p = np.array([r.prompt_len for r in reqs], dtype=float)
    d = np.array([r.max_tokens for r in reqs], dtype=float)
    return {"num_requests": len(reqs), "total_prompt_tokens": int(p.sum()),
            "total_output_tokens": int(d.sum()),
            "median_prompt_len": float(np.median(p)), "median_output_len": float(np.median(d)),
            "p90_prompt_len": float(np.percentile(p, 90)), "p90_output_len": float(np.percentile(d, 90))}
