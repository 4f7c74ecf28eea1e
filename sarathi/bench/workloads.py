"""Synthetic benchmark workloads: request lengths, token ids and arrival times.

Everything here is pure Python + numpy and deterministic given ``seed``. Token ids are
drawn uniformly from ``[min_token_id, vocab_size)`` so that special tokens (BOS/EOS,
ChatML markers, which sit at the low ids of the SmolLM2 vocabulary) never appear in a
prompt.

Workloads serialise to JSON as a list of objects
``{"prompt_token_ids": [...], "max_tokens": int, "arrival_time": float}`` (see
:func:`save_workload` / :func:`load_workload`); the peer scripts in
``benchmarks/peers/`` read the same format.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: Lowest token id used for random prompts (ids below are reserved/special in most vocabularies).
DEFAULT_MIN_TOKEN_ID = 100
#: Vocabulary size of SmolLM2 (the default model).
DEFAULT_VOCAB_SIZE = 49152

# ShareGPT4 statistics quoted by Sarathi-Serve (tokens): medians and 90th percentiles.
SHAREGPT4_PROMPT_MEDIAN = 1730.0
SHAREGPT4_PROMPT_P90 = 5696.0
SHAREGPT4_OUTPUT_MEDIAN = 415.0
SHAREGPT4_OUTPUT_P90 = 834.0
#: Standard normal 90th percentile, used to turn a (median, P90) pair into a lognormal sigma.
_Z90 = 1.2815515655446004
#: Default down-scaling of ShareGPT4 lengths so a 135M model on a 2-core CPU finishes quickly.
SHAREGPT_SCALE = 0.125


@dataclass
class BenchRequest:
    """One benchmark request: prompt token ids, decode length, and arrival time (s)."""

    prompt_token_ids: list[int]
    max_tokens: int
    arrival_time: float = 0.0

    @property
    def prompt_len(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_token_ids)


def lognormal_params(median: float, p90: float) -> tuple[float, float]:
    """Return ``(mu, sigma)`` of the lognormal whose median and 90th percentile are given."""
    if median <= 0 or p90 <= median:
        raise ValueError("need 0 < median < p90")
    return math.log(median), math.log(p90 / median) / _Z90


def _random_prompt(rng: np.random.Generator, length: int, vocab_size: int, min_token_id: int) -> list[int]:
    if not 0 <= min_token_id < vocab_size:
        raise ValueError(f"min_token_id {min_token_id} outside [0, vocab_size={vocab_size})")
    return rng.integers(min_token_id, vocab_size, size=length).tolist()


def from_lengths(
    prompt_lens: Sequence[int],
    output_lens: Sequence[int],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    min_token_id: int = DEFAULT_MIN_TOKEN_ID,
) -> list[BenchRequest]:
    """Build requests with random prompt tokens for the given prompt/output lengths."""
    if len(prompt_lens) != len(output_lens):
        raise ValueError("prompt_lens and output_lens differ in length")
    rng = np.random.default_rng(seed)
    requests = []
    for p, d in zip(prompt_lens, output_lens, strict=True):
        if p < 1 or d < 1:
            raise ValueError(f"lengths must be >= 1, got prompt {p}, output {d}")
        requests.append(BenchRequest(_random_prompt(rng, int(p), vocab_size, min_token_id), int(d)))
    return requests


def fixed(
    P: int,
    D: int,
    num_requests: int,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    min_token_id: int = DEFAULT_MIN_TOKEN_ID,
) -> list[BenchRequest]:
    """``num_requests`` requests, each with ``P`` random prompt tokens and ``D`` output tokens."""
    return from_lengths([P] * num_requests, [D] * num_requests, vocab_size, seed, min_token_id)


def ranged(
    p_range: tuple[int, int],
    d_range: tuple[int, int],
    num_requests: int,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    min_token_id: int = DEFAULT_MIN_TOKEN_ID,
) -> list[BenchRequest]:
    """Requests with prompt and output lengths drawn uniformly from inclusive ranges."""
    (p_lo, p_hi), (d_lo, d_hi) = p_range, d_range
    if not (1 <= p_lo <= p_hi and 1 <= d_lo <= d_hi):
        raise ValueError(f"bad ranges {p_range}, {d_range}")
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(p_lo, p_hi + 1, size=num_requests)
    output_lens = rng.integers(d_lo, d_hi + 1, size=num_requests)
    return from_lengths(prompt_lens.tolist(), output_lens.tolist(), vocab_size, seed + 1, min_token_id)


def sharegpt_like(
    num_requests: int,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    max_len: int = 2048,
    scale: float = SHAREGPT_SCALE,
    min_prompt_len: int = 4,
    min_token_id: int = DEFAULT_MIN_TOKEN_ID,
) -> list[BenchRequest]:
    """Generated (not downloaded) requests whose lengths mimic ShareGPT4, scaled down.

    Prompt and output lengths are independent lognormals fitted to the ShareGPT4 medians
    and P90s quoted by Sarathi-Serve (prompts: median 1730, P90 5696; outputs: median 415,
    P90 834), i.e. ``mu = ln(median)``, ``sigma = ln(P90 / median) / z_0.9``:

    - prompt:  mu = ln(1730) = 7.456, sigma = 0.930
    - output:  mu = ln(415)  = 6.028, sigma = 0.545

    Both are then multiplied by ``scale`` (default 1/8, so medians ~216 and ~52 tokens,
    P90s ~712 and ~104) because a 135M model on a 2-core CPU cannot get through ShareGPT's
    real lengths in a benchmark-sized time; the P:D ratio (~4.2 at the median) is kept.
    Lengths are rounded, outputs clipped to ``[1, max_len - min_prompt_len]`` and prompts
    to ``[min_prompt_len, max_len - output]``, so every request fits in ``max_len``.
    """
    if max_len <= min_prompt_len:
        raise ValueError("max_len must exceed min_prompt_len")
    rng = np.random.default_rng(seed)
    p_mu, p_sigma = lognormal_params(SHAREGPT4_PROMPT_MEDIAN, SHAREGPT4_PROMPT_P90)
    d_mu, d_sigma = lognormal_params(SHAREGPT4_OUTPUT_MEDIAN, SHAREGPT4_OUTPUT_P90)
    prompt_raw = rng.lognormal(p_mu, p_sigma, size=num_requests) * scale
    output_raw = rng.lognormal(d_mu, d_sigma, size=num_requests) * scale
    output_lens = np.clip(np.rint(output_raw), 1, max_len - min_prompt_len).astype(int)
    prompt_lens = np.clip(np.rint(prompt_raw), min_prompt_len, max_len - output_lens).astype(int)
    return from_lengths(prompt_lens.tolist(), output_lens.tolist(), vocab_size, seed + 1, min_token_id)


def _arrivals_from_gaps(gaps: np.ndarray) -> list[float]:
    """Cumulative arrival times; the first request arrives at t = 0."""
    times = np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if len(gaps) else np.zeros(0)
    return [float(t) for t in times]


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """``n`` arrival times (s) of a Poisson process with ``rate`` requests/s (inf: all at 0)."""
    return gamma_arrivals(rate, 1.0, n, seed)


def gamma_arrivals(rate: float, cv: float, n: int, seed: int = 0) -> list[float]:
    """``n`` arrival times (s) with gamma inter-arrival gaps of mean ``1/rate`` and CV ``cv``.

    ``cv = 1`` is a Poisson process; larger ``cv`` is burstier. ``rate = inf`` puts every
    request at t = 0.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if rate <= 0 or cv <= 0:
        raise ValueError("rate and cv must be positive")
    if math.isinf(rate):
        return [0.0] * n
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    gaps = np.random.default_rng(seed).gamma(shape, scale, size=n)
    return _arrivals_from_gaps(gaps)


def with_arrivals(requests: Sequence[BenchRequest], arrival_times: Sequence[float]) -> list[BenchRequest]:
    """Return copies of ``requests`` carrying the given arrival times."""
    if len(requests) != len(arrival_times):
        raise ValueError("requests and arrival_times differ in length")
    return [
        BenchRequest(list(r.prompt_token_ids), r.max_tokens, float(t))
        for r, t in zip(requests, arrival_times, strict=True)
    ]


def summarize(requests: Sequence[BenchRequest]) -> dict[str, float]:
    """Basic length statistics of a workload (count, totals, means, medians, P90s)."""
    p = np.array([r.prompt_len for r in requests], dtype=float)
    d = np.array([r.max_tokens for r in requests], dtype=float)
    if len(p) == 0:
        return {"num_requests": 0}
    return {
        "num_requests": len(requests),
        "total_prompt_tokens": int(p.sum()),
        "total_output_tokens": int(d.sum()),
        "mean_prompt_len": float(p.mean()),
        "median_prompt_len": float(np.median(p)),
        "p90_prompt_len": float(np.percentile(p, 90)),
        "mean_output_len": float(d.mean()),
        "median_output_len": float(np.median(d)),
        "p90_output_len": float(np.percentile(d, 90)),
    }


def to_json_list(requests: Sequence[BenchRequest]) -> list[dict]:
    """Requests as plain dicts (the workload JSON format)."""
    return [asdict(r) for r in requests]


def from_json_list(items: Sequence[dict]) -> list[BenchRequest]:
    """Inverse of :func:`to_json_list`; ``arrival_time`` is optional."""
    return [
        BenchRequest(
            [int(t) for t in it["prompt_token_ids"]],
            int(it["max_tokens"]),
            float(it.get("arrival_time", 0.0)),
        )
        for it in items
    ]


def save_workload(requests: Sequence[BenchRequest], path: str | Path) -> None:
    """Write a workload JSON file."""
    Path(path).write_text(json.dumps(to_json_list(requests)))


def load_workload(path: str | Path) -> list[BenchRequest]:
    """Read a workload JSON file."""
    return from_json_list(json.loads(Path(path).read_text()))
