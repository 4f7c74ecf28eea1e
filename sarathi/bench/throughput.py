"""Offline throughput benchmark, the SARATHI paper's methodology, on ONE loaded model.

Synthetic requests with prompt length P and decode length D (``ignore_eos``, greedy) are all queued at
t = 0 and run to completion with a fixed maximum batch size B (``max_num_seqs``) under every policy:
``sarathi`` at several chunk sizes, ``vllm`` (prefill-first), ``orca`` and ``request_level``. Policies
are swapped with ``engine.reconfigure`` (no reload), and the KV cache is sized so that B requests of
the longest length fit (no preemption: B, not memory, is the limit, as in the paper).

Per policy it reports end-to-end throughput ((prompt + generated tokens) / wall time), prefill and
decode throughput (tokens per second of time attributed to them, see :mod:`sarathi.bench.costmodel`),
the step mix, prefill MFU and decode bandwidth utilisation against limits measured in the same run,
and the speedup over the ``vllm`` policy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sarathi.bench import roofline, workloads
from sarathi.bench.common import dtype_name, loadavg, markdown_table, model_shape
from sarathi.bench.costmodel import StepCostModel, attribute
from sarathi.bench.probe import BatchProbe
from sarathi.bench.workloads import BenchRequest

POLICIES = ("sarathi", "vllm", "orca", "request_level")

PRESETS: dict[str, dict[str, Any]] = {
    # About 5 minutes on a 2-core Xeon with 1 thread at load average 3; less on a quiet machine.
    "quick": {"prompt_lens": [256], "pd_ratios": [10, 20, 50], "num_requests": 16, "max_num_seqs": 8,
              "chunk_sizes": [128, 256], "ranged": False, "sharegpt": 0, "sharegpt_scale": 1 / 16},
    # The paper's sweep shape plus ranged and ShareGPT-like lengths: hours on the same machine.
    "full": {"prompt_lens": [128, 512, 1024], "pd_ratios": [1, 5, 10, 20, 50], "num_requests": 16,
             "max_num_seqs": 8, "chunk_sizes": [128, 256, 512], "ranged": True, "sharegpt": 64,
             "sharegpt_scale": 1 / 8},
}


@dataclass
class Workload:
    """A named list of requests; ``P``/``D``/``pd`` are set for fixed-length sweeps."""

    name: str
    kind: str
    requests: list[BenchRequest]
    P: int | None = None
    D: int | None = None
    pd: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "P": self.P, "D": self.D, "pd": self.pd,
                **workloads.summarize(self.requests)}


@dataclass
class Policy:
    """A scheduler plus its chunk size (sarathi only); ``label`` names it in tables."""

    scheduler: str
    chunk_size: int | None = None
    label: str = field(default="")

    def __post_init__(self) -> None:
        if self.scheduler not in POLICIES:
            raise ValueError(f"policy: unknown scheduler {self.scheduler!r}; choose from {POLICIES}")
        if not self.label:
            self.label = f"sarathi-c{self.chunk_size}" if self.scheduler == "sarathi" else self.scheduler


def make_policies(schedulers: Sequence[str], chunk_sizes: Sequence[int]) -> list[Policy]:
    """One policy per scheduler, with ``sarathi`` expanded to one per chunk size."""
    out: list[Policy] = []
    for s in schedulers:
        if s == "sarathi":
            out.extend(Policy("sarathi", c) for c in chunk_sizes)
        else:
            out.append(Policy(s))
    return out


def sweep_workloads(prompt_lens: Sequence[int], pd_ratios: Sequence[float], num_requests: int,
                    vocab_size: int, seed: int = 0, ranged: bool = False) -> list[Workload]:
    """Fixed P:D sweeps (``D = round(P / pd)``) and, with ``ranged``, P and D drawn uniformly
    from +-50% around each P at the median P:D of the sweep."""
    out = []
    for P in prompt_lens:
        for pd in pd_ratios:
            D = max(1, round(P / pd))
            reqs = workloads.fixed(P, D, num_requests, vocab_size, seed)
            out.append(Workload(f"P{P}-D{D}", "fixed", reqs, P, D, pd))
        if ranged:
            pd = sorted(pd_ratios)[len(pd_ratios) // 2]
            D = max(1, round(P / pd))
            reqs = workloads.ranged((max(1, P // 2), P * 3 // 2), (max(1, D // 2), max(1, D * 3 // 2)),
                                    num_requests, vocab_size, seed)
            out.append(Workload(f"ranged-P{P // 2}..{P * 3 // 2}-D{max(1, D // 2)}..{D * 3 // 2}",
                                "ranged", reqs, P, D, pd))
    return out


def sharegpt_workload(num_requests: int, vocab_size: int, scale: float, max_len: int,
                      seed: int = 0) -> Workload:
    """``workloads.sharegpt_like``: independent lognormal prompt/output lengths fitted to ShareGPT4's
    median and P90 (prompts 1730 / 5696, outputs 415 / 834 tokens) and multiplied by ``scale``."""
    reqs = workloads.sharegpt_like(num_requests, vocab_size, seed, max_len=max_len, scale=scale)
    return Workload(f"sharegpt-x{scale:g}", "sharegpt", reqs)


@contextmanager
def record_batches(engine: Any) -> Iterator[list[dict[str, list]]]:
    """Log every non-empty batch the engine's current scheduler returns, read-only: prompt chunks as
    ``(tokens, past)`` and decode contexts. One entry per ``StepRecord`` the engine appends."""
    sched = engine.scheduler
    log: list[dict[str, list]] = []
    original = sched.schedule

    def schedule() -> Any:
        plan = original()
        if not plan.is_empty:
            log.append({
                "chunks": [(s.num_tokens, s.start) for s in plan.seqs if not s.is_decode],
                "decodes": [s.start + 1 for s in plan.seqs if s.is_decode],
            })
        return plan

    sched.schedule = schedule
    try:
        yield log
    finally:
        del sched.schedule


def kv_blocks_for(reqs: Sequence[BenchRequest], max_num_seqs: int, block_size: int) -> int:
    """Blocks for ``max_num_seqs`` requests of the workload's longest length (+1 block each)."""
    longest = max(r.prompt_len + r.max_tokens for r in reqs)
    return max_num_seqs * (-(-longest // block_size) + 1)


def run_policy(llm: Any, wl: Workload, pol: Policy, max_num_seqs: int, model: StepCostModel | None,
               limits: dict[str, Any] | None, tile_size: int | None = None) -> dict[str, Any]:
    """Run one workload under one policy and return its metrics."""
    from sarathi.sampling_params import SamplingParams

    eng = llm.engine
    eng.reconfigure(scheduler=pol.scheduler, chunk_size=pol.chunk_size, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=None, tile_size=tile_size if pol.scheduler == "sarathi" else None,
                    num_kv_blocks=kv_blocks_for(wl.requests, max_num_seqs, eng.args.block_size))
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in wl.requests]
    params = [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True, temperature=0.0) for r in wl.requests]
    load0, first = loadavg(), eng.stats.num_steps
    with record_batches(eng) as log:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    steps = [s for s in eng.stats.steps if s.step > first]
    if len(steps) != len(log):
        raise RuntimeError(f"{len(steps)} steps recorded but {len(log)} batches scheduled")
    return summarize_run(wl, pol, outs, wall, steps, log, model, limits, model_shape(eng), dtype_name(eng),
                         load0)


def summarize_run(wl: Workload, pol: Policy, outs: Sequence[Any], wall: float, steps: Sequence[Any],
                  log: Sequence[dict[str, list]], model: StepCostModel | None,
                  limits: dict[str, Any] | None, shape: roofline.LlamaShape, dtype: str,
                  load0: list[float]) -> dict[str, Any]:
    """Throughputs, attribution, step mix and roofline utilisation of one run."""
    prompt_tokens = sum(r.prompt_len for r in wl.requests)
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    sched_prompt = sum(s.num_prompt_tokens for s in steps)
    sched_decode = sum(s.num_decode_tokens for s in steps)
    att = attribute(steps, log, model)
    kinds = {"prefill_only": 0, "decode_only": 0, "mixed": 0}
    pre_flops = pre_only_flops = pre_only_s = dec_bytes = dec_only_s = all_flops = 0.0
    dec_batches = []
    for st, b in zip(steps, log, strict=True):
        f_pre = sum(roofline.prefill_flops(shape, n, past) for n, past in b["chunks"])
        f_dec = roofline.decode_flops(shape, b["decodes"])
        pre_flops += f_pre
        all_flops += f_pre + f_dec
        if not b["decodes"]:
            kinds["prefill_only"] += 1
            pre_only_flops += f_pre
            pre_only_s += st.duration
        elif not b["chunks"]:
            kinds["decode_only"] += 1
            dec_bytes += roofline.decode_bytes(shape, b["decodes"], dtype)
            dec_only_s += st.duration
            dec_batches.append(len(b["decodes"]))
        else:
            kinds["mixed"] += 1
    steps_s = sum(s.duration for s in steps)
    res: dict[str, Any] = {
        "workload": wl.name, "policy": pol.label, "scheduler": pol.scheduler, "chunk_size": pol.chunk_size,
        "num_requests": len(outs), "wall_s": wall, "steps_s": steps_s, "engine_overhead_s": wall - steps_s,
        "prompt_tokens": prompt_tokens, "generated_tokens": generated,
        "expected_generated_tokens": sum(r.max_tokens for r in wl.requests),
        "scheduled_prompt_tokens": sched_prompt, "scheduled_decode_tokens": sched_decode,
        "throughput_tok_s": (prompt_tokens + generated) / wall,
        "output_throughput_tok_s": generated / wall, "request_throughput": len(outs) / wall,
        "prefill_time_s": att.prefill_time_s, "decode_time_s": att.decode_time_s,
        "decode_time_s_marginal": att.decode_time_s_marginal,
        "decode_time_s_proportional": att.decode_time_s_proportional,
        "mixed_steps_clamped": att.mixed_steps_clamped,
        "prefill_tok_s": _rate(sched_prompt, att.prefill_time_s),
        "decode_tok_s": _rate(sched_decode, att.decode_time_s),
        "decode_tok_s_marginal": _rate(sched_decode, att.decode_time_s_marginal),
        "decode_tok_s_proportional": _rate(sched_decode, att.decode_time_s_proportional),
        "num_steps": len(steps), **{f"steps_{k}": v for k, v in kinds.items()},
        "mean_decode_batch": sum(dec_batches) / len(dec_batches) if dec_batches else None,
        "num_preempted": sum(s.num_preempted for s in steps),
        "loadavg_start": load0, "loadavg_end": loadavg(),
        # every step as [prompt tokens, decode tokens, milliseconds], for re-analysis
        "steps": [[s.num_prompt_tokens, s.num_decode_tokens, round(s.duration * 1e3, 3)] for s in steps],
    }
    if limits:
        peak = limits["gemm_gflops"].get(dtype) or limits["gemm_gflops"]["float32"]
        bw = limits["mem_bw_gbs"]
        res["prefill_mfu_prefill_only_steps"] = roofline.mfu(pre_only_flops, pre_only_s, peak) or None
        res["prefill_mfu_attributed"] = roofline.mfu(pre_flops, att.prefill_time_s, peak) or None
        res["overall_mfu"] = roofline.mfu(all_flops, steps_s, peak)
        res["decode_bw_util_decode_only_steps"] = roofline.bandwidth_utilisation(dec_bytes, dec_only_s,
                                                                                 bw) or None
    return res


def _rate(tokens: float, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 and tokens > 0 else None


def add_speedups(results: list[dict[str, Any]], baseline: str = "vllm") -> None:
    """Add ``speedup_*`` (ratio to the ``baseline`` policy of the same workload) to every row."""
    base = {r["workload"]: r for r in results if r["policy"] == baseline}
    for r in results:
        b = base.get(r["workload"])
        for key in ("throughput_tok_s", "decode_tok_s", "prefill_tok_s"):
            ok = b is not None and r.get(key) and b.get(key)
            r[f"speedup_{key}"] = r[key] / b[key] if ok else None


def warm_up(llm: Any, wl: Workload, max_num_seqs: int) -> None:
    """Untimed run of two short requests from the workload (first-call allocations, kernel caches)."""
    from sarathi.sampling_params import SamplingParams

    reqs = wl.requests[:2]
    llm.engine.reconfigure(scheduler="sarathi", chunk_size=None, max_num_seqs=max_num_seqs,
                           num_kv_blocks=kv_blocks_for(reqs, 2, llm.engine.args.block_size))
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs],
                 SamplingParams(max_tokens=min(4, reqs[0].max_tokens), ignore_eos=True), use_tqdm=False)


def calibrate(llm: Any, wl: Workload, policies: Sequence[Policy], max_num_seqs: int,
              repeats: int = 3) -> StepCostModel:
    """Step cost model covering the workload's lengths, the policies' chunk sizes and batch size."""
    longest = max(r.prompt_len for r in wl.requests)
    context = max(r.prompt_len + r.max_tokens for r in wl.requests)
    chunk = max([p.chunk_size or 0 for p in policies] + [min(longest, 1024)])
    batch = max(1, min(8, max_num_seqs))
    probe = BatchProbe(llm.engine, max_kv_tokens=max(chunk + longest, batch * context) + 64)
    sizes = [p.chunk_size for p in policies if p.chunk_size]
    return StepCostModel.calibrate(probe, max_tokens=chunk, max_past=longest, max_context=context,
                                   repeats=repeats, extra_sizes=sizes, decode_batch=batch)


def run_throughput(llm: Any, wls: Sequence[Workload], policies: Sequence[Policy], max_num_seqs: int,
                   limits: dict[str, Any] | None, calibrate_repeats: int = 3, tile_size: int | None = None,
                   progress: bool = True, repeats: int = 1) -> dict[str, Any]:
    """Warm up, then per workload: calibrate the step cost model and run every policy ``repeats``
    times, alternating the policy order (A..Z, Z..A, ...) so slow drift of a shared machine hits every
    policy alike. Each row is the run with the median end-to-end throughput; ``runs_*`` list all."""
    from tqdm.auto import tqdm

    warm_up(llm, wls[0], max_num_seqs)
    results, models = [], {}
    bar = tqdm(total=len(wls) * len(policies) * repeats, desc="runs", disable=not progress)
    for wl in wls:
        model = calibrate(llm, wl, policies, max_num_seqs, calibrate_repeats) if calibrate_repeats else None
        models[wl.name] = model.to_dict() if model else None
        runs: dict[str, list[dict[str, Any]]] = {p.label: [] for p in policies}
        for rep in range(repeats):
            for pol in policies if rep % 2 == 0 else policies[::-1]:
                bar.set_postfix_str(f"{wl.name} {pol.label}")
                runs[pol.label].append(run_policy(llm, wl, pol, max_num_seqs, model, limits, tile_size))
                bar.update(1)
        for pol in policies:
            rs = sorted(runs[pol.label], key=lambda r: r["throughput_tok_s"])
            row = dict(rs[len(rs) // 2])
            for key in ("throughput_tok_s", "decode_tok_s", "prefill_tok_s"):
                row[f"runs_{key}"] = [r[key] for r in runs[pol.label]]
            results.append(row)
    bar.close()
    add_speedups(results)
    return {"workloads": [w.describe() for w in wls], "policies": [p.label for p in policies],
            "max_num_seqs": max_num_seqs, "repeats": repeats, "cost_models": models, "results": results}


TABLE_COLUMNS = [
    ("workload", "workload"), ("policy", "policy"), ("throughput_tok_s", "e2e tok/s"),
    ("speedup_throughput_tok_s", "e2e x vllm"), ("decode_tok_s", "decode tok/s"),
    ("speedup_decode_tok_s", "decode x vllm"), ("prefill_tok_s", "prefill tok/s"),
    ("steps_mix", "steps P/D/M"), ("prefill_mfu_prefill_only_steps", "prefill MFU"),
    ("decode_bw_util_decode_only_steps", "decode BW util"), ("num_preempted", "preempt"),
]


def table(results: Sequence[dict[str, Any]]) -> str:
    """The headline Markdown table (ratios with 2 decimals, rates with 1)."""
    rows = []
    for r in results:
        row = dict(r)
        row["steps_mix"] = f"{r['steps_prefill_only']}/{r['steps_decode_only']}/{r['steps_mixed']}"
        for k in ("speedup_throughput_tok_s", "speedup_decode_tok_s", "prefill_mfu_prefill_only_steps",
                  "decode_bw_util_decode_only_steps"):
            if isinstance(row.get(k), float):
                row[k] = f"{row[k]:.2f}"
        rows.append(row)
    return markdown_table(rows, TABLE_COLUMNS)
