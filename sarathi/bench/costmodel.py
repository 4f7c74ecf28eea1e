"""Attribute engine step time to prefill and decode work (the rule behind "decode throughput").

Prefill-only steps are prefill time and decode-only steps are decode time. A *mixed* step (a prompt
chunk with piggybacked decodes) is split **in proportion to a cost model** calibrated in the same
process, on the same threads, just before the workload's runs (:class:`StepCostModel`):

- the prompt chunks cost what a prefill-only step with the same chunks costs:
  ``P(chunks) = L(sum n) + c * sum n * (past + (n + 1) / 2)``, where ``L`` interpolates measured
  prefill-only times at ``past = 0`` (their causal attention term removed) and ``c`` is the cost of
  one attended (query, key) pair, fitted from chunks behind a long cached prefix;
- each piggybacked decode costs ``b + g * context``: ``b`` is the per-row slope of ``L`` at the
  largest calibrated chunk (the decode's row rides in the same GEMMs as the prompt rows), ``g`` the
  cost of reading one cached token in decode attention, from decode-only batches at two contexts;
- decode time of the step = step time x ``D / (P + D)``; prefill time = the rest.

Why a cost *share* rather than subtracting the predicted prefill cost from the step (the paper's own
arithmetic: 238.4 ms for 1021 prompt tokens + 3 decodes against 234.8 ms for the chunk alone, so
1.2 ms per decode): on a shared CPU one step varies by 10-25 %, i.e. by as much as all its decodes
cost, and subtraction puts that whole error on the decodes. The share spreads it over prompt and
decode tokens in proportion to their modelled cost. The subtraction (``*_marginal``) and a plain
token-count split (``*_proportional``) are reported too; where they disagree a lot, trust none of them
and look at ``bench profile``'s back-to-back decode-maximal measurement instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sarathi.bench.probe import BatchProbe, BatchSpec


def attended_pairs(chunks: Sequence[tuple[int, int]]) -> float:
    """(query, key) pairs that causal attention computes for prompt chunks ``(n, past)``."""
    return float(sum(n * (past + (n + 1) / 2) for n, past in chunks))


def _median_ms(probe: BatchProbe, spec: BatchSpec, repeats: int) -> float:
    return float(np.median(probe.time(spec, repeats=repeats))) * 1000.0


@dataclass
class StepCostModel:
    """Predicts the cost (ms) of a step's prompt chunks and of its piggybacked decodes."""

    grid: list[int]
    base_ms: list[float]
    ms_per_pair: float
    decode_row_ms: float
    decode_ms_per_context_token: float
    points: list[dict[str, float]] = field(default_factory=list)

    def base(self, n: int) -> float:
        """Non-attention time of ``n`` prompt tokens (linear extrapolation past the grid)."""
        g, b = self.grid, self.base_ms
        if n <= g[-1] or len(g) == 1:
            return float(np.interp(n, g, b))
        return b[-1] + self.slope() * (n - g[-1])

    def slope(self) -> float:
        """ms per extra prompt row at the top of the grid."""
        g, b = self.grid, self.base_ms
        return max(0.0, (b[-1] - b[-2]) / (g[-1] - g[-2])) if len(g) > 1 else b[0] / g[0]

    def prefill_ms(self, chunks: Sequence[tuple[int, int]]) -> float:
        if not chunks:
            return 0.0
        return self.base(sum(n for n, _ in chunks)) + self.ms_per_pair * attended_pairs(chunks)

    def decode_ms(self, contexts: Sequence[int]) -> float:
        """Marginal cost of decodes that ride along a prompt chunk."""
        return sum(self.decode_row_ms + self.decode_ms_per_context_token * c for c in contexts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def calibrate(cls, probe: BatchProbe, max_tokens: int, max_past: int, max_context: int,
                  repeats: int = 3, extra_sizes: Sequence[int] = (), decode_batch: int = 8) -> StepCostModel:
        """Medians of ``repeats`` runs of: prefill-only chunks of 16, 64, 256, ... up to ``max_tokens``
        plus ``extra_sizes`` at ``past = 0``; a 64-token chunk behind ``max_past / 2`` and ``max_past``
        cached tokens; ``decode_batch`` decodes at context 16 and ``max_context``."""
        sizes = [n for n in (16, 64, 256, 1024, 4096, *extra_sizes) if n < max_tokens]
        grid = sorted({*sizes, max_tokens})
        points = []
        t0 = []
        for n in grid:
            t0.append(_median_ms(probe, BatchSpec(chunks=[(n, 0)]), repeats))
            points.append({"tokens": n, "past": 0, "decodes": 0, "context": 0, "ms": t0[-1]})
        coefs = []
        n_a = min(64, max_tokens)
        for past in sorted({max(1, max_past // 2), max(1, max_past)}):
            ms = _median_ms(probe, BatchSpec(chunks=[(n_a, past)]), repeats)
            points.append({"tokens": n_a, "past": past, "decodes": 0, "context": 0, "ms": ms})
            coefs.append((ms - float(np.interp(n_a, grid, t0))) / (n_a * past))
        c = max(0.0, float(np.median(coefs))) if coefs else 0.0
        dec = {}
        for ctx in sorted({16, max(17, max_context)}):
            dec[ctx] = _median_ms(probe, BatchSpec(decodes=[ctx] * decode_batch), repeats)
            points.append({"tokens": 0, "past": 0, "decodes": decode_batch, "context": ctx, "ms": dec[ctx]})
        (lo, t_lo), (hi, t_hi) = min(dec.items()), max(dec.items())
        g = max(0.0, (t_hi - t_lo) / (decode_batch * (hi - lo)))
        base = [max(0.0, t - c * n * (n + 1) / 2) for n, t in zip(grid, t0)]
        model = cls(grid, base, c, 0.0, g, points)
        model.decode_row_ms = model.slope()
        return model


@dataclass
class StepAttribution:
    """Totals over a run's steps under the three rules (seconds)."""

    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    decode_time_s_marginal: float = 0.0
    decode_time_s_proportional: float = 0.0
    mixed_steps_clamped: int = 0


def attribute(steps: Sequence[Any], batches: Sequence[dict[str, list]],
              model: StepCostModel | None) -> StepAttribution:
    """Split every step's duration into prefill and decode time (see the module docstring).

    ``steps`` are the engine's ``StepRecord``s; ``batches[i]`` holds step i's prompt ``chunks`` as
    ``(tokens, past)`` and its ``decodes`` as contexts. Without a model, the token-count split is used.
    """
    out = StepAttribution()
    for st, b in zip(steps, batches, strict=True):
        p, d, t = st.num_prompt_tokens, st.num_decode_tokens, st.duration
        prop = t * d / (p + d) if p + d else 0.0
        out.decode_time_s_proportional += prop
        if d == 0 or p == 0:
            share = marginal = t if p == 0 else 0.0
        elif model is None:
            share = marginal = prop
        else:
            pre_ms, dec_ms = model.prefill_ms(b["chunks"]), model.decode_ms(b["decodes"])
            share = t * dec_ms / (pre_ms + dec_ms) if pre_ms + dec_ms > 0 else prop
            if pre_ms / 1000.0 >= t:
                out.mixed_steps_clamped += 1
            marginal = max(0.0, t - pre_ms / 1000.0)
        out.decode_time_s += share
        out.decode_time_s_marginal += marginal
        out.prefill_time_s += t - share
    return out
