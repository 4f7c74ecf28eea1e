"""Measure this machine as a ``HardwareSpec`` (the ``local`` hardware) and check the cost model against
the real engine.

``profile_local`` measures the GEMM peak and memory bandwidth with torch, times hand-made batches of
the default model through the real executor (:class:`sarathi.bench.probe.BatchProbe`: prompt chunks
with and without a cached prefix, decode batches, decode-maximal mixes), and fits what a roofline
cannot know about a CPU running a small model from Python: how far from the roofline the linear and
attention kernels run (``linear_scale``, ``attention_scale``) and the host overheads per step and
per sequence, by non-negative least squares; the matmul tile is the candidate that fits best.

``profile_local(quick=True)`` is the lighter profile measured on first use of ``--chunk-size auto`` or
``--hardware local`` (:func:`ensure_local_profile`): 14 of the 27 batches (chunks up to 256 tokens, no
16 x 1024-context decode batch, the fastest of two timed runs instead of the median of three). On the
2-core EPYC it took 9.7 s in all (6.3 s of probes) for the bfloat16 default engine, against 70 s (54 s of
probes) for the full float32 profile; refitting a full profile's own samples from that subset predicted
all 27 of them with a median error of 8.0% against the full fit's 7.3% (5.7% against 5.5% on an older
profile). The full profile (``sarathi simulate --profile-hardware``) replaces it in the same file.

``validate`` runs a mixed workload through the real engine, predicts every step from its plan, and
reports the relative error's median and p90, and ``staircase`` measures step time against chunk size
next to the model's prediction.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sarathi.sim.costmodel import CostModel
from sarathi.sim.hardware import HardwareSpec, local_profile_path

logger = logging.getLogger("sarathi")

TILE_CANDIDATES = (1, 4, 8, 16, 32, 64)
# No per-token host overhead: it is collinear with the linear layers' time once they are compute-bound,
# and a fit that may trade one for the other returns unphysical mixes (ms per token, linear x0.3).
FEATURES = ("linear", "attention", "step", "seq")


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (drop the most negative one and refit)."""
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (sol >= 0).all():
            x[:] = 0
            x[active] = sol
            return x
        active.pop(int(np.argmin(sol)))
    return x


def _features(cost: CostModel, chunks: Sequence[tuple[int, int]], decodes: Sequence[int], sampled: int,
              ) -> tuple[list[float], float]:
    """Fit features of one batch (seconds at scale 1, counts) and the part taken as is (other ops)."""
    c = cost.step(chunks, decodes, sampled)
    return [c.linear_s, c.attention_s, 1.0, float(len(chunks) + len(decodes))], c.other_s


def fit_spec(base: HardwareSpec, model_config: Any, dtype: str, samples: Sequence[dict[str, Any]],
             ) -> tuple[HardwareSpec, float]:
    """Fit scales and overheads (and pick the tile) to measured ``samples`` ({chunks, decodes, sampled,
    seconds}); returns the spec and its median relative error on the samples."""
    best: tuple[float, HardwareSpec] | None = None
    y = np.array([s["seconds"] for s in samples])
    for tile in TILE_CANDIDATES:
        raw = replace(base, tile=tile, linear_scale=1.0, attention_scale=1.0, other_scale=1.0,
                      layer_overhead_s=0.0, step_overhead_s=0.0, token_overhead_s=0.0, seq_overhead_s=0.0)
        cm = CostModel(model_config, raw, dtype)
        rows, fixed = zip(*(_features(cm, s["chunks"], s["decodes"], s["sampled"]) for s in samples))
        a = np.array(rows)
        w = 1.0 / y  # relative error is what we report: weight each sample by 1 / its time
        x = _nnls(a * w[:, None], (y - np.array(fixed)) * w)
        spec = replace(raw, linear_scale=float(x[0]) or 1.0, attention_scale=float(x[1]) or 1.0,
                       step_overhead_s=float(x[2]), seq_overhead_s=float(x[3]))
        fitted = CostModel(model_config, spec, dtype)
        pred = np.array([fitted.step(s["chunks"], s["decodes"], s["sampled"]).total_s for s in samples])
        err = float(np.median(np.abs(pred - y) / y))
        if best is None or err < best[0] - 1e-3:  # prefer the smaller tile unless a larger one fits better
            best = (err, spec)
    assert best is not None
    return best[1], best[0]


def probe_batches(max_chunk: int = 512, quick: bool = False) -> list[tuple[list[tuple[int, int]], list[int]]]:
    """The calibration batches: prefill chunks, chunks behind a prefix, decode batches, mixes.

    ``quick``: a subset (14 batches, chunks up to 256 tokens) that still separates every fitted term:
    off-grid chunk sizes for the tile, a chunk behind a long prefix and decodes at two contexts for
    attention, one to sixteen sequences for the per-sequence overhead, and one decode-maximal mix.
    """
    if quick:
        return ([([(n, 0)], []) for n in (8, 16, 32, 64, 72, 100, 128, 130, 256)] + [([(64, 1024)], [])]
                + [([], [128]), ([], [1024] * 4), ([], [128] * 16), ([(112, 0)], [512] * 16)])
    out: list[tuple[list[tuple[int, int]], list[int]]] = []
    # Sizes off the power-of-two grid too (72, 100, 130, 264): they tell the candidate tiles apart.
    out += [([(n, 0)], []) for n in (8, 16, 32, 64, 72, 96, 100, 128, 130, 192, 256, 264, 384, max_chunk)]
    out += [([(64, p)], []) for p in (256, 1024)] + [([(256, 512)], [])]
    out += [([], [ctx] * b) for b in (1, 4, 16) for ctx in (128, 1024)]
    out += [([(128 - k, 0)], [512] * k) for k in (4, 16)] + [([(256 - k, 256)], [256] * k) for k in (2, 8)]
    return out


def measure(engine: Any, batches: Sequence[tuple[list[tuple[int, int]], list[int]]], repeats: int = 3,
            best: bool = False) -> list[dict[str, Any]]:
    """Median (``best``: fastest) wall time of each batch through the engine's real executor. With two
    repeats the median is their mean, and one run slowed by another process on a shared machine (a
    descheduled OpenMP thread can make a step 10x slower) spoils it; the fastest run does not."""
    from sarathi.bench.probe import BatchProbe, BatchSpec

    need = max(sum(n + p for n, p in c) + sum(d) for c, d in batches)
    probe = BatchProbe(engine, max_kv_tokens=need + 64)
    probe.time(BatchSpec(chunks=[(16, 0)], decodes=[16]), repeats=1)  # warm-up
    samples = []
    for chunks, decodes in batches:
        times = probe.time(BatchSpec(chunks=list(chunks), decodes=list(decodes)), repeats)
        t = float(min(times) if best else np.median(times))
        # every probe entry ends at its last known token, so each one samples
        samples.append({"chunks": chunks, "decodes": decodes, "sampled": len(chunks) + len(decodes),
                        "seconds": t})
    return samples


def _total_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not every platform has them
        return 16 * 1024**3


def profile_local(engine: Any = None, threads: int | None = 1, save: bool = True, quick: bool = False,
                  ) -> tuple[HardwareSpec, Path | None]:
    """Measure this machine and fit the ``local`` spec for the default model's dtype; saves it to the
    cache (``local_profile_path()``) unless ``save`` is False.

    ``threads``: torch threads to measure with (set for the rest of the process, as before; None keeps
    the current count). ``engine``: the engine whose executor is timed (default: the default model,
    loaded here and shut down afterwards). ``quick``: the lighter batch set (see the module docstring).
    """
    from sarathi.bench.common import cpu_info, dtype_name, measure_limits, set_threads

    threads = set_threads(threads)
    limits = measure_limits(threads, quick=True)
    own = engine is None
    if engine is None:
        from sarathi.llm import LLM

        engine = LLM(kv_cache_memory="64MiB").engine
    try:
        return _profile(engine, limits, threads, save, quick, cpu_info()["model"], dtype_name(engine))
    finally:
        if own:
            engine.shutdown()


def _profile(engine: Any, limits: dict[str, Any], threads: int, save: bool, quick: bool, cpu: str,
             dtype: str) -> tuple[HardwareSpec, Path | None]:
    peaks = {dt: g * 1e9 for dt, g in limits["gemm_gflops"].items()}
    base = HardwareSpec("local", peaks, limits["mem_bw_gbs"] * 1e9, _total_memory(), tile=1,
                        matmul_efficiency=1.0, attention_efficiency=1.0, bw_efficiency=1.0,
                        decode_attention_padded=True,
                        notes=f"measured: {cpu}, {threads} torch threads, model dtype {dtype}"
                              + (" (quick profile)" if quick else ""))
    t0 = time.perf_counter()
    samples = measure(engine, probe_batches(quick=quick), repeats=2 if quick else 3, best=quick)
    spec, err = fit_spec(base, engine.model_config, dtype, samples)
    spec.measured = {"limits": limits, "threads": threads, "dtype": dtype, "fit_median_rel_error": err,
                     "samples": samples, "seconds": time.perf_counter() - t0, "date": time.strftime("%F %T"),
                     "preset": "quick" if quick else "full"}
    path = spec.save(local_profile_path()) if save else None
    return spec, path


def ensure_local_profile(quick: bool = True, threads: int = 1) -> HardwareSpec:
    """The ``local`` spec: the cached profile if there is one, else measured now and cached at
    ``local_profile_path()`` (set ``$SARATHI_CACHE`` to move it). Logs, at WARNING so that a CLI shows it,
    that it measures and how long that took.

    ``quick``: the lighter preset (see the module docstring). ``threads``: torch threads to measure with,
    1 as ``sarathi simulate --profile-hardware`` does (on a shared machine, two OpenMP threads make
    single runs up to 10x slower at random, which no fit survives); the process's own thread count is
    restored afterwards. Invariant: after a successful return the cache file exists.
    """
    path = local_profile_path()
    if path.exists():
        return HardwareSpec.from_json(json.loads(path.read_text()))
    logger.warning("no profile of this machine at %s: measuring it once (%s profile, %d torch thread(s), %s "
                   "on a 2-core CPU; `sarathi simulate --profile-hardware` measures the full one)", path,
                   "quick" if quick else "full", threads, "10-20 s" if quick else "about 70 s")
    import torch

    before = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        spec, saved = profile_local(threads=threads, save=True, quick=quick)
    finally:
        torch.set_num_threads(before)
    logger.warning("profiled this machine in %.1f s (fit median error %.1f%%, tile %d); cached at %s",
                   time.perf_counter() - t0, 100 * spec.measured["fit_median_rel_error"], spec.tile, saved)
    return spec


def record_plans(engine: Any) -> tuple[list[Any], Any]:
    """Wrap ``engine.scheduler.schedule`` to keep every non-empty plan; returns (log, restore)."""
    sched = engine.scheduler
    log: list[Any] = []
    original = sched.schedule

    def schedule() -> Any:
        plan = original()
        if not plan.is_empty:
            log.append(plan)
        return plan

    sched.schedule = schedule

    def restore() -> None:
        del sched.schedule

    return log, restore


def validate(engine: Any, spec: HardwareSpec, prompts: Sequence[int], outputs: Sequence[int],
             chunk_size: int = 128, max_num_seqs: int = 8) -> dict[str, Any]:
    """Run a mixed offline workload through the real engine (sarathi policy), predict every step from
    its plan, and compare with the measured step times."""
    from sarathi.bench.common import dtype_name
    from sarathi.sampling_params import SamplingParams

    engine.reconfigure(scheduler="sarathi", chunk_size=chunk_size, max_num_seqs=max_num_seqs,
                       num_kv_blocks=4096, tile_size=None)
    cost = CostModel(engine.model_config, spec, dtype_name(engine))
    first = engine.stats.num_steps
    log, restore = record_plans(engine)
    try:
        for i, (p, d) in enumerate(zip(prompts, outputs)):
            engine.add_request(f"val{i}", [100 + (i * 31 + j) % 20000 for j in range(p)],
                               SamplingParams(max_tokens=d, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        restore()
    steps = [s for s in engine.stats.steps if s.step > first]
    if len(steps) != len(log):
        raise RuntimeError(f"{len(steps)} steps recorded but {len(log)} plans scheduled")
    measured = np.array([s.duration for s in steps])
    predicted = np.array([cost.plan_cost(p)[0].total_s for p in log])
    rel = np.abs(predicted - measured) / measured
    kinds = ["mixed" if p.num_prompt_tokens and p.num_decode_tokens else
             "prefill" if p.num_prompt_tokens else "decode" for p in log]
    by_kind = {k: {"steps": kinds.count(k),
                   "median_rel_error": float(np.median(rel[[x == k for x in kinds]]))}
               for k in sorted(set(kinds))}
    return {"num_steps": len(steps), "median_rel_error": float(np.median(rel)),
            "p90_rel_error": float(np.percentile(rel, 90)), "mean_signed_error": float(np.mean(
                (predicted - measured) / measured)), "by_kind": by_kind,
            "total_measured_s": float(measured.sum()), "total_predicted_s": float(predicted.sum()),
            "steps": [[p.num_prompt_tokens, p.num_decode_tokens, round(m * 1e3, 3), round(q * 1e3, 3)]
                      for p, m, q in zip(log, measured, predicted)]}


def compare_runs(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> dict[str, float]:
    """Two ``validate`` runs of one workload: step-by-step relative difference of the measured times
    (the noise floor), and the model's error against the faster of the two (less disturbed) times."""
    if [s[:2] for s in a] != [s[:2] for s in b]:
        raise RuntimeError("the two runs scheduled different steps")
    m1, m2 = np.array([s[2] for s in a]), np.array([s[2] for s in b])
    pred = np.array([s[3] for s in a])
    run_diff = np.abs(m1 - m2) / np.maximum(m1, m2)
    best = np.minimum(m1, m2)
    rel = np.abs(pred - best) / best
    return {"run_to_run_median_rel_diff": float(np.median(run_diff)),
            "run_to_run_p90_rel_diff": float(np.percentile(run_diff, 90)),
            "model_vs_faster_run_median_rel_error": float(np.median(rel)),
            "model_vs_faster_run_p90_rel_error": float(np.percentile(rel, 90))}


def staircase(engine: Any, spec: HardwareSpec, sizes: Sequence[int], repeats: int = 3,
              ) -> list[dict[str, float]]:
    """Prefill-only step time against chunk size: measured (real executor) and predicted."""
    from sarathi.bench.common import dtype_name

    cost = CostModel(engine.model_config, spec, dtype_name(engine))
    samples = measure(engine, [([(n, 0)], []) for n in sizes], repeats)
    return [{"tokens": n, "measured_ms": s["seconds"] * 1e3,
             "predicted_ms": cost.step([(n, 0)], [], 1).total_s * 1e3} for n, s in zip(sizes, samples)]
