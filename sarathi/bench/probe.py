"""Time hand-made batches straight through the engine's executor, and split their time by op kind.

A batch is a list of prompt chunks ``(num_tokens, past_tokens)`` plus a list of decode contexts (each
decode computes one token that attends to ``context`` cached tokens, itself included). The probe builds
real `StepPlan`s over KV blocks from the engine's own block manager and
calls ``engine.executor.execute`` (flatten + forward + sampling), so the scheduler and detokenizer are
*not* timed. KV contents are whatever the cache holds (zeros): timing does not depend on the values.

The op split uses ``torch.profiler`` on one extra run and groups aten ops by their *outermost*
categorised ancestor:

- ``linear``: ``aten::linear`` / ``addmm`` / ``mm`` / ``matmul`` and any op named ``*linear*`` (e.g.
  oneDNN's ``mkldnn::_linear_pointwise`` on packed weights): every projection, the MLP, the LM head;
- ``attention``: ``aten::scaled_dot_product_attention`` and its kernels, plus the paged-KV traffic
  (``index`` gathers of cached K/V, ``index_copy_`` / ``index_put_`` writes; the few tiny ``index``
  ops elsewhere, e.g. RoPE table rows, land here too);
- ``other``: everything else (norms, RoPE, SiLU, residual adds, embedding, sampling) and the Python
  time between ops (profiled wall time minus the ops above).

Shares come from the profiled run and are applied to the best un-profiled wall time, because the
profiler's own overhead inflates runs made of many small ops.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LINEAR_OPS = frozenset({"aten::linear", "aten::addmm", "aten::mm", "aten::matmul"})
ATTENTION_OPS = frozenset({
    "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_efficient_attention",
    "aten::index", "aten::index_copy_", "aten::index_put_", "aten::index_select",
})
CATEGORIES = ("linear", "attention", "other")


@dataclass
class BatchSpec:
    """Prompt chunks ``(tokens, past)`` and decode contexts of one synthetic step."""

    chunks: list[tuple[int, int]] = field(default_factory=list)
    decodes: list[int] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(n for n, _ in self.chunks)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.decodes)

    def kv_tokens(self) -> int:
        """KV slots the batch needs (every request's past plus its new tokens)."""
        return sum(n + p for n, p in self.chunks) + sum(self.decodes)


def _category(name: str) -> str | None:
    if name == "aten::embedding":  # its inner index_select is a token lookup, not KV traffic
        return "other"
    if name in LINEAR_OPS or "linear" in name:
        return "linear"
    if name in ATTENTION_OPS:
        return "attention"
    return None


class BatchProbe:
    """Builds and times synthetic batches on an engine (which it reconfigures; no request may run)."""

    def __init__(self, engine: Any, max_kv_tokens: int, seed: int = 0) -> None:
        bs = engine.args.block_size
        # Each request may waste up to one partly filled block: leave room for that too.
        self.engine = engine
        self.max_kv_tokens = max_kv_tokens
        self._blocks = -(-max_kv_tokens // bs) + 256
        engine.reconfigure(scheduler="sarathi", num_kv_blocks=self._blocks, kv_cache_memory=None)
        self._rng = np.random.default_rng(seed)
        self._vocab = engine.model_config.vocab_size

    def _request(self, rid: str, length: int, computed: int) -> Any:
        from sarathi.request import Request
        from sarathi.sampling_params import SamplingParams

        ids = self._rng.integers(min(100, self._vocab - 1), self._vocab, size=length).tolist()
        params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)  # greedy, as the benchmarks
        req = Request(rid, ids, params, max_tokens=1, group_id=rid)
        self.engine.kv.allocate(req, length)
        req.num_computed_tokens = computed
        return req

    def build(self, spec: BatchSpec) -> tuple[Any, list[Any]]:
        """The ``StepPlan`` for ``spec`` plus its requests (call :meth:`release` afterwards)."""
        from sarathi.scheduler import SamplingSpec, SeqPlan, StepPlan

        if spec.kv_tokens() > self.max_kv_tokens:
            raise ValueError(f"batch needs {spec.kv_tokens()} KV tokens, probe holds {self.max_kv_tokens}")
        plan, reqs = StepPlan(0), []
        greedy = SamplingSpec()  # every entry ends at its last token, so each samples one (greedily)
        entries = [(f"probe-d{i}", ctx, ctx - 1) for i, ctx in enumerate(spec.decodes)]
        entries += [(f"probe-p{i}", past + n, past) for i, (n, past) in enumerate(spec.chunks)]
        for rid, length, computed in entries:
            req = self._request(rid, length, computed)
            plan.seqs.append(SeqPlan(rid, req.token_ids[computed:], computed, list(req.block_ids), greedy,
                                     is_decode=length - computed == 1))
            reqs.append(req)
        return plan, reqs

    def release(self, reqs: Sequence[Any]) -> None:
        for r in reqs:
            self.engine.kv.free(r)

    def time(self, spec: BatchSpec, repeats: int = 3, warmup: int = 1) -> list[float]:
        """Wall seconds of ``repeats`` executions of the batch (after ``warmup`` untimed ones)."""
        batch, reqs = self.build(spec)
        try:
            for _ in range(warmup):
                self.engine.executor.execute(batch)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.engine.executor.execute(batch)
                times.append(time.perf_counter() - t0)
            return times
        finally:
            self.release(reqs)

    def split(self, spec: BatchSpec) -> dict[str, float]:
        """Milliseconds per category from one profiled run (``wall`` = profiled wall time)."""
        from torch.profiler import ProfilerActivity, profile

        batch, reqs = self.build(spec)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                self.engine.executor.execute(batch)
                wall = time.perf_counter() - t0
        finally:
            self.release(reqs)
        return split_events(prof.events(), wall)


def split_events(events: Any, wall_s: float) -> dict[str, float]:
    """Group profiler events' self CPU time by their outermost categorised ancestor (ms)."""
    ms = dict.fromkeys(CATEGORIES, 0.0)
    tracked = 0.0
    for ev in events:
        cat, node = None, ev
        while node is not None:  # walk up: the outermost categorised op wins
            cat = _category(node.name) or cat
            node = node.cpu_parent
        self_ms = ev.self_cpu_time_total / 1000.0
        tracked += self_ms
        ms[cat or "other"] += self_ms
    ms["other"] += max(0.0, wall_s * 1000.0 - tracked)  # Python between ops
    ms["wall"] = wall_s * 1000.0
    return ms


def timed_split(probe: BatchProbe, spec: BatchSpec, repeats: int, profile_ops: bool = True) -> dict[str, Any]:
    """Best-of-``repeats`` wall time of ``spec`` with its linear/attention/other split (ms)."""
    times = probe.time(spec, repeats=repeats)
    best = min(times) * 1000.0
    row: dict[str, Any] = {
        "num_prompt_tokens": spec.num_prompt_tokens, "num_decode_tokens": len(spec.decodes),
        "time_ms": best, "time_ms_median": float(np.median(times)) * 1000.0, "repeats": repeats,
    }
    if profile_ops:
        raw = probe.split(spec)
        scale = best / raw["wall"] if raw["wall"] > 0 else 0.0
        for c in CATEGORIES:
            row[f"{c}_ms"] = raw[c] * scale
        row["profiled_wall_ms"] = raw["wall"]
    return row
