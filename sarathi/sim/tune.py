"""``sarathi tune``: recommend the token budget (chunk size) for a model, hardware and workload.

1. The SARATHI rule: all decodes piggyback when ``P:D = C / (B - 1)``, so ``C = (B - 1) x P / D``,
   rounded to the matmul tile (a step that spills a few tokens into a new tile pays for all of it).
2. With a TBT SLO (Sarathi-Serve's rule): the largest tile-multiple budget whose predicted full step
   (B - 1 decodes at the workload's mean context plus a chunk filling the rest) meets the SLO; the
   recommendation is the smaller of the two, so the latency target always holds.
3. The choice and its neighbours are simulated on the workload (offline, all requests at t = 0) to show
   the predicted throughput and latency of each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sarathi.sim import workload as wl
from sarathi.sim.costmodel import CostModel
from sarathi.sim.runner import SimConfig, build_engine, run

MAX_BUDGET = 16384


@dataclass
class Recommendation:
    chunk_size: int
    pd_rule: int
    slo_max: int | None
    tile: int
    step_ms: float
    candidates: list[dict[str, Any]]


def full_step_ms(cost: CostModel, budget: int, B: int, P: int, D: int) -> float:
    """A decode-maximal step of ``budget`` tokens: B - 1 decodes at the mean context, the rest a chunk
    halfway through its prompt."""
    decodes = min(B - 1, budget - 1)
    chunk = budget - decodes
    return cost.step([(chunk, P // 2)], [P + D // 2] * decodes).total_s * 1e3


def pd_rule(B: int, P: int, D: int, tile: int) -> int:
    """The SARATHI rule ``C = (B - 1) x P / D`` rounded to the nearest tile multiple, at least one tile."""
    raw = (B - 1) * P / max(1, D)
    return max(tile, round(raw / tile) * tile)


def slo_max_budget(cost: CostModel, B: int, P: int, D: int, tile: int, slo_tbt_ms: float,
                   max_budget: int = MAX_BUDGET) -> int:
    """The largest tile multiple up to ``max_budget`` whose full step meets ``slo_tbt_ms`` (one tile if
    none does)."""
    ok = [b for b in range(tile, max_budget + 1, tile) if full_step_ms(cost, b, B, P, D) <= slo_tbt_ms]
    return max(ok) if ok else tile


def choose_budget(cost: CostModel, B: int, P: int, D: int, tile: int, slo_tbt_ms: float | None = None,
                  max_budget: int = MAX_BUDGET) -> tuple[int, int, int | None]:
    """Rules 1 and 2 of the module docstring: ``(choice, pd_rule, slo_max)``; ``slo_max`` is None without
    an SLO. Shared by ``sarathi tune`` and ``--chunk-size auto`` (:mod:`sarathi.sim.autotune`), so both
    give the same budget for the same inputs."""
    pd = pd_rule(B, P, D, tile)
    slo_max = None if slo_tbt_ms is None else slo_max_budget(cost, B, P, D, tile, slo_tbt_ms, max_budget)
    return (pd if slo_max is None else min(pd, slo_max)), pd, slo_max


def recommend(cfg: SimConfig, P: int, D: int, slo_tbt_ms: float | None = None,
              num_requests: int | None = None, simulate: bool = True) -> Recommendation:
    """``cfg.model`` may be a preset, a config.json / checkpoint or a ``ModelConfig``; ``cfg.hardware`` a
    name or a ``HardwareSpec``."""
    engine, _ = build_engine(cfg)
    ex = engine.executor
    cost: CostModel = ex.cost  # type: ignore[attr-defined]
    tile = cfg.tile_size or cost.hw.tile
    B = cfg.max_num_seqs
    choice, pd, slo_max = choose_budget(cost, B, P, D, tile, slo_tbt_ms)
    sizes = sorted({max(tile, choice // 2), max(tile, choice - tile), choice, choice + tile, choice * 2})
    candidates = []
    for c in sizes:
        row: dict[str, Any] = {"chunk_size": c, "full_step_ms": full_step_ms(cost, c, B, P, D),
                               "chosen": c == choice}
        if simulate:
            reqs = wl.fixed(P, D, num_requests or 4 * B)
            eng, clock = build_engine(replace(cfg, scheduler="sarathi", chunk_size=c, tile_size=None))
            m = run(eng, clock, reqs).metrics
            row.update({k: m[k] for k in ("throughput_tok_s", "decode_tok_s", "ttft_ms_p50", "tbt_ms_p50",
                                          "tbt_ms_p99")})
        candidates.append(row)
    return Recommendation(choice, pd, slo_max, tile, full_step_ms(cost, choice, B, P, D), candidates)


def format_recommendation(r: Recommendation, P: int, D: int, B: int, slo: float | None) -> str:
    lines = [f"P:D rule: C = (B - 1) x P / D = {B - 1} x {P} / {D} -> {r.pd_rule} (tile {r.tile})"]
    if slo is not None:
        lines.append(f"TBT SLO {slo:g} ms: largest budget whose full step meets it: {r.slo_max}")
    lines.append(f"recommended chunk size: {r.chunk_size} (predicted full step {r.step_ms:.1f} ms)")
    lines.append("")
    lines.append("chunk | full step ms | throughput tok/s | decode tok/s | TTFT p50 ms | TBT p50 ms | "
                 "TBT p99 ms")
    lines.append("---|---|---|---|---|---|---")

    def f(v: Any, d: int = 1) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    for c in r.candidates:
        mark = " *" if c["chosen"] else ""
        lines.append(f"{c['chunk_size']}{mark} | {f(c['full_step_ms'])} | {f(c.get('throughput_tok_s'))} | "
                     f"{f(c.get('decode_tok_s'))} | {f(c.get('ttft_ms_p50'))} | "
                     f"{f(c.get('tbt_ms_p50'), 2)} | {f(c.get('tbt_ms_p99'), 2)}")
    return "\n".join(lines)
