"""Build an engine on the simulated executor and drive a workload through it in virtual time.

``build_engine`` makes a normal ``LLMEngine`` (same scheduler classes, same KV block manager) around a
model shape, with ``SimulatedExecutor`` bound to a hardware spec, TP/PP degrees and a ``VirtualClock``.
``run`` feeds requests at their arrival times, jumps the clock over idle gaps, and reports the
benchmarks' metrics from the virtual timestamps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sarathi.config import EngineArgs
from sarathi.engine.group import RequestGroup
from sarathi.engine.llm_engine import LLMEngine
from sarathi.executor.simulated import SimStep, SimulatedExecutor, resolve_dtype
from sarathi.model.config import ModelConfig
from sarathi.outputs import RequestMetrics
from sarathi.request import Request
from sarathi.sampling_params import SamplingParams
from sarathi.sim.clock import VirtualClock
from sarathi.sim.costmodel import CostModel
from sarathi.sim.hardware import HardwareSpec, get_hardware
from sarathi.sim.models import get_model_config
from sarathi.sim.workload import SimRequest

KV_MEMORY_FRACTION = 0.9  # of device memory usable for weights + KV (activations and workspace take the rest)


@dataclass
class SimConfig:
    """What ``build_engine`` simulates. ``model``: a preset name, an HF config.json / folder, a checkpoint,
    or a ``ModelConfig`` object (e.g. ``engine.model_config`` of a loaded engine)."""

    model: str | ModelConfig = "llama-2-13b"
    hardware: str | HardwareSpec = "a6000"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    scheduler: str = "sarathi"
    chunk_size: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    tile_size: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: what device memory leaves after the weights
    max_model_len: int | None = None
    dtype: str = "auto"
    memory_fraction: float = KV_MEMORY_FRACTION
    # Off: simulated prompts are placeholder ids (identical across requests), and the paper's numbers
    # are without prefix reuse.
    enable_prefix_caching: bool = False


def build_engine(cfg: SimConfig) -> tuple[LLMEngine, VirtualClock]:
    """An engine whose executor is the cost model, reading and advancing a virtual clock."""
    model_config = get_model_config(cfg.model)
    name = cfg.model if isinstance(cfg.model, str) else model_label(model_config)
    hw = get_hardware(cfg.hardware)
    blocks = cfg.num_kv_blocks
    if blocks is None:  # what device memory leaves after the weights
        cost = CostModel(model_config, hw, resolve_dtype(cfg.dtype, model_config.torch_dtype, hw.is_gpu),
                         cfg.tensor_parallel_size, cfg.pipeline_parallel_size)
        free = hw.memory_bytes * cfg.memory_fraction - cost.weight_bytes_per_device()
        blocks = int(free // (cost.kv_bytes_per_token() * cfg.block_size))
        if blocks < 1:
            raise ValueError(f"model: {name} ({cost.weight_bytes_per_device() / 2**30:.1f} GiB per "
                             f"device) does not fit on {hw.name} with TP {cfg.tensor_parallel_size} x PP "
                             f"{cfg.pipeline_parallel_size}")
    clock = VirtualClock()
    executor = SimulatedExecutor.bind(hardware=hw, tensor_parallel_size=cfg.tensor_parallel_size,
                                      pipeline_parallel_size=cfg.pipeline_parallel_size, clock=clock)
    args = EngineArgs(model=name, dtype=cfg.dtype, scheduler=cfg.scheduler, executor="simulated",
                      chunk_size=cfg.chunk_size, max_num_seqs=cfg.max_num_seqs,
                      max_num_batched_tokens=cfg.max_num_batched_tokens, tile_size=cfg.tile_size,
                      block_size=cfg.block_size, num_kv_blocks=blocks, max_model_len=cfg.max_model_len,
                      enable_prefix_caching=cfg.enable_prefix_caching)
    return LLMEngine(args, clock=clock, executor_class=executor, model_config=model_config), clock


def model_label(cfg: ModelConfig) -> str:
    """A readable name for a model given only by its shape."""
    return (f"{cfg.architecture}(hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
            f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads)")


@dataclass
class SimResult:
    """Metrics of one simulated run (seconds of virtual time)."""

    metrics: dict[str, Any]
    ttft: list[float] = field(default_factory=list)
    tbt: list[float] = field(default_factory=list)


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def run(engine: LLMEngine, clock: VirtualClock, requests: Sequence[SimRequest], progress: bool = False,
        ) -> SimResult:
    """Run ``requests`` to completion (each with ``ignore_eos`` and its ``max_tokens``).

    Requests are handed to the engine when the virtual clock reaches their arrival; to keep memory flat
    at paper scale, at most ``max_num_seqs + 1`` of them wait inside the engine at once. That leaves
    every scheduling decision unchanged: no policy admits more than ``max_num_seqs`` requests in a
    step, and the rest wait in arrival order either way.
    """
    ex: SimulatedExecutor = engine.executor  # type: ignore[assignment]
    check_fits(engine, requests)
    params = SamplingParams(max_tokens=None, ignore_eos=True, detokenize=False)  # timing needs no text
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_time)
    window = engine.args.max_num_seqs + 1
    tok = ex.token_id
    last_token: dict[str, float] = {}
    ttft: list[float] = []
    tbt: list[float] = []
    arrival: dict[str, float] = {}
    finished_at: list[float] = []
    nxt = 0
    first_step, first_sim = engine.stats.num_steps, len(ex.steps)
    log = logging.getLogger("sarathi")
    level = log.level
    log.setLevel(logging.WARNING)  # the engine logs per request and step at INFO: far too much here
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="simulate", unit="req")
    try:
        while nxt < len(order) or engine.has_unfinished_requests():
            if not engine.has_unfinished_requests() and nxt < len(order):
                clock.advance_to(requests[order[nxt]].arrival_time)  # idle: jump to the next arrival
            while (nxt < len(order) and requests[order[nxt]].arrival_time <= clock.now
                   and len(engine.scheduler.waiting) < window):
                i = order[nxt]
                r = requests[i]
                rid = str(i)
                engine.add_group(_group(rid, r, tok, params))
                arrival[rid] = r.arrival_time
                nxt += 1
            before = engine.stats.num_steps
            outs = engine.step()
            if engine.stats.num_steps == before and engine.has_unfinished_requests():
                # Nothing could be scheduled and nothing is in flight: only a new arrival can help.
                if nxt == len(order):
                    raise RuntimeError("simulation stalled: requests wait but none can be scheduled")
                clock.advance_to(max(clock.now, requests[order[nxt]].arrival_time))
                if len(engine.scheduler.waiting) >= window:
                    raise RuntimeError("simulation stalled: the waiting window is full and nothing runs")
                continue
            now = clock.now
            for o in outs:
                rid = o.request_id
                prev = last_token.get(rid)
                if prev is None:
                    ttft.append(now - arrival[rid])
                else:
                    tbt.append(now - prev)
                last_token[rid] = now
                if o.finished:
                    finished_at.append(now)
                    del last_token[rid], arrival[rid]
                    if bar is not None:
                        bar.update(1)
    finally:
        log.setLevel(level)
        if bar is not None:
            bar.close()
    preempted = sum(s.num_preempted for s in engine.stats.steps if s.step > first_step)
    return SimResult(summarize(ex.steps[first_sim:], ex.cost.pp, requests, ttft, tbt, finished_at, preempted),
                     ttft, tbt)


def check_fits(engine: LLMEngine, requests: Sequence[SimRequest]) -> None:
    """The input processor's length checks, once for the whole workload (see ``_group``)."""
    limit = min(engine.max_model_len, engine.kv.num_blocks * engine.kv.block_size)
    for i, r in enumerate(requests):
        if r.prompt_len < 1 or r.max_tokens < 1:
            raise ValueError(f"workload: request {i} has prompt {r.prompt_len} / output {r.max_tokens} "
                             "tokens; both must be >= 1")
        if r.prompt_len + r.max_tokens > limit:
            raise ValueError(f"workload: request {i} needs {r.prompt_len + r.max_tokens} tokens, more than "
                             f"the context ({engine.max_model_len}) or the KV cache "
                             f"({engine.kv.num_blocks * engine.kv.block_size}) holds")


def _group(rid: str, r: SimRequest, tok: int, params: SamplingParams) -> RequestGroup:
    """What ``InputProcessor.make_group`` builds, without its per-token id check: it would cost more
    than the simulation of a paper-scale prompt, and these ids are ours (``check_fits`` did the rest).
    One ``SamplingParams`` serves every request: ``Request.max_tokens`` carries the length."""
    ids = r.prompt_token_ids or [tok] * r.prompt_len
    req = Request(rid, ids, params, arrival_time=r.arrival_time, max_tokens=r.max_tokens, group_id=rid)
    return RequestGroup(rid, None, ids, [req], RequestMetrics(arrival_time=r.arrival_time))


def summarize(steps: Sequence[SimStep], pp: int, requests: Sequence[SimRequest], ttft: Sequence[float],
              tbt: Sequence[float], finished_at: Sequence[float], num_preempted: int = 0) -> dict[str, Any]:
    prompt = sum(r.prompt_len for r in requests)
    output = sum(r.max_tokens for r in requests)
    start = min((r.arrival_time for r in requests), default=0.0)
    end = max(finished_at, default=start)
    span = max(end - start, 1e-12)
    sched_prompt = sum(s.num_prompt_tokens for s in steps)
    sched_decode = sum(s.num_decode_tokens for s in steps)
    pre_s = dec_s = 0.0
    kinds = {"prefill_only": 0, "decode_only": 0, "mixed": 0}
    for s in steps:
        t = s.cost.total_s
        if s.num_decode_tokens == 0:
            kinds["prefill_only"] += 1
            pre_s += t
        elif s.num_prompt_tokens == 0:
            kinds["decode_only"] += 1
            dec_s += t
        else:  # the decodes' marginal cost; the prompt chunk gets the rest
            kinds["mixed"] += 1
            dec_s += s.decode_s
            pre_s += t - s.decode_s
    busy = sum(e - b for s in steps for b, e in zip(s.stage_start, s.stage_end))
    first = min((s.start for s in steps), default=0.0)
    last = max((s.end for s in steps), default=0.0)
    bubble = 1.0 - busy / (pp * (last - first)) if last > first else 0.0
    ms = 1e3
    return {
        "num_requests": len(requests), "prompt_tokens": prompt, "output_tokens": output,
        "makespan_s": span, "num_steps": len(steps), **{f"steps_{k}": v for k, v in kinds.items()},
        "scheduled_prompt_tokens": sched_prompt, "scheduled_decode_tokens": sched_decode,
        "throughput_tok_s": (prompt + output) / span, "output_throughput_tok_s": output / span,
        "request_throughput": len(requests) / span,
        "prefill_tok_s": sched_prompt / pre_s if pre_s else None,
        "decode_tok_s": sched_decode / dec_s if dec_s else None,
        "ttft_ms_p50": _scale(_pct(ttft, 50), ms), "ttft_ms_p90": _scale(_pct(ttft, 90), ms),
        "ttft_ms_p99": _scale(_pct(ttft, 99), ms),
        "tbt_ms_p50": _scale(_pct(tbt, 50), ms), "tbt_ms_p90": _scale(_pct(tbt, 90), ms),
        "tbt_ms_p99": _scale(_pct(tbt, 99), ms), "tbt_ms_max": _scale(max(tbt, default=None), ms),
        "bubble_fraction": bubble, "mean_step_ms": (sum(s.cost.total_s for s in steps) / len(steps) * ms)
        if steps else None,
        "num_preempted": num_preempted,
    }


def _scale(v: float | None, k: float) -> float | None:
    return None if v is None else v * k


def write_trace(ex: SimulatedExecutor, path: str | Path, max_steps: int = 200_000) -> Path:
    """A Perfetto / chrome://tracing JSON: one track per pipeline stage, one slice per step."""
    events: list[dict[str, Any]] = [
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": f"stage {i}"}}
        for i in range(ex.cost.pp)]
    for s in ex.steps[:max_steps]:
        args = {"prompt_tokens": s.num_prompt_tokens, "decode_tokens": s.num_decode_tokens,
                "seqs": s.num_seqs,
                "linear_ms": s.cost.linear_s * 1e3, "attention_ms": s.cost.attention_s * 1e3,
                "other_ms": s.cost.other_s * 1e3, "comm_ms": s.cost.comm_s * 1e3}
        for i, (b, e) in enumerate(zip(s.stage_start, s.stage_end)):
            events.append({"name": f"step {s.step_id} P{s.num_prompt_tokens} D{s.num_decode_tokens}",
                           "ph": "X", "pid": 0, "tid": i, "ts": b * 1e6, "dur": (e - b) * 1e6, "args": args})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return path
