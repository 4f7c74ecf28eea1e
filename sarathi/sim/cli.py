"""``sarathi simulate``: run a workload through the real scheduler on a cost model, in virtual time.

Only argparse is imported at module level, so ``sarathi --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def add_simulate_parser(sub: Any, handlers: dict[str, Handler]) -> None:
    p = sub.add_parser("simulate", help="simulate a workload on a model preset and hardware spec",
                       description=__doc__)
    p.add_argument("--model", default="llama-2-13b",
                   help="preset (llama-2-7b, llama-2-13b, llama-2-70b, llama-13b, llama-33b, mistral-7b, "
                        "gpt3-175b) or an HF config.json / folder (default: %(default)s)")
    p.add_argument("--hardware", default="a6000",
                   help="a6000 | a100-80gb | h100 | h200 | local (this machine's cached profile, measured "
                        "once if missing) | a spec .json (default: %(default)s)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1)
    p.add_argument("--scheduler", default="sarathi", help="sarathi | vllm | orca | request_level")
    p.add_argument("--chunk-size", type=int, default=None, help="sarathi token budget (default 512)")
    p.add_argument("--tile-size", type=int, default=None, help="round the sarathi budget down to this tile")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests in a batch (B)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV blocks per device (default: what memory leaves after the weights)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto", help="auto | float16 | bfloat16 | float32")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="fixed", choices=["fixed", "ranged", "sharegpt", "zipf", "file"])
    w.add_argument("--num-requests", type=int, default=100)
    w.add_argument("--prompt-len", type=int, default=1024, help="fixed/ranged: prompt tokens (P)")
    w.add_argument("--output-len", type=int, default=None, help="fixed/ranged: output tokens (D; default P / "
                                                                 "--pd-ratio)")
    w.add_argument("--pd-ratio", type=float, default=10.0,
                   help="P:D when --output-len is not given; zipf too")
    w.add_argument("--range-ratio", type=float, default=0.5, help="ranged: lengths in (1 +- r) x P, D")
    w.add_argument("--min-len", type=int, default=1024, help="zipf: shortest total length")
    w.add_argument("--max-len", type=int, default=4096, help="zipf: longest total length; sharegpt: cap")
    w.add_argument("--zipf-theta", type=float, default=0.4)
    w.add_argument("--sharegpt-scale", type=float, default=1.0)
    w.add_argument("--workload-file", default=None, help="file: a `sarathi bench workload` JSON")
    w.add_argument("--qps", type=float, default=math.inf, help="Poisson arrival rate (default: all at t=0)")
    w.add_argument("--cv", type=float, default=1.0, help="arrival burstiness (1: Poisson)")
    w.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--trace", type=Path, default=None, help="write a Perfetto (chrome://tracing) JSON here")
    o.add_argument("--json", type=Path, default=None, help="write the metrics JSON here")
    o.add_argument("--progress", action="store_true")
    o.add_argument("--profile-hardware", action="store_true",
                   help="measure this machine (the `local` spec), save it to the cache and exit")
    handlers["simulate"] = run_cli


def make_workload(ns: argparse.Namespace) -> list[Any]:
    from sarathi.sim import workload as wl

    d = ns.output_len or max(1, round(ns.prompt_len / ns.pd_ratio))
    if ns.workload == "fixed":
        reqs = wl.fixed(ns.prompt_len, d, ns.num_requests)
    elif ns.workload == "ranged":
        r = ns.range_ratio
        reqs = wl.ranged((max(1, int(ns.prompt_len * (1 - r))), max(1, int(ns.prompt_len * (1 + r)))),
                         (max(1, int(d * (1 - r))), max(1, int(d * (1 + r)))), ns.num_requests, ns.seed)
    elif ns.workload == "sharegpt":
        reqs = wl.sharegpt(ns.num_requests, ns.seed, ns.max_len, ns.sharegpt_scale)
    elif ns.workload == "zipf":
        reqs = wl.zipf(ns.num_requests, ns.min_len, ns.max_len, ns.pd_ratio, ns.zipf_theta, ns.seed)
    else:
        if not ns.workload_file:
            raise ValueError("workload: --workload file needs --workload-file")
        return wl.from_file(ns.workload_file)  # arrival times come from the file
    return wl.with_arrivals(reqs, ns.qps, ns.cv, ns.seed)


METRIC_LINES = [
    ("throughput_tok_s", "throughput (prompt + output tok/s)", 1),
    ("output_throughput_tok_s", "output tok/s", 1), ("request_throughput", "requests/s", 3),
    ("prefill_tok_s", "prefill tok/s", 1), ("decode_tok_s", "decode tok/s", 1),
    ("ttft_ms_p50", "TTFT p50 ms", 1), ("ttft_ms_p90", "TTFT p90 ms", 1), ("ttft_ms_p99", "TTFT p99 ms", 1),
    ("tbt_ms_p50", "TBT p50 ms", 2), ("tbt_ms_p90", "TBT p90 ms", 2), ("tbt_ms_p99", "TBT p99 ms", 2),
    ("tbt_ms_max", "TBT max ms", 2), ("bubble_fraction", "bubble fraction", 3),
    ("makespan_s", "makespan s (virtual)", 2), ("num_steps", "steps", 0), ("mean_step_ms", "mean step ms", 2),
]


def format_metrics(m: dict[str, Any]) -> str:
    lines = []
    for key, label, digits in METRIC_LINES:
        v = m.get(key)
        lines.append(f"{label:38s} {'-' if v is None else f'{v:.{digits}f}'}")
    lines.append(f"{'steps prefill-only / decode-only / mixed':38s} {m['steps_prefill_only']} / "
                 f"{m['steps_decode_only']} / {m['steps_mixed']}")
    return "\n".join(lines)


def run_cli(ns: argparse.Namespace) -> int:
    if ns.profile_hardware:
        from sarathi.sim.calibrate import profile_local

        spec, path = profile_local()
        print(json.dumps(spec.to_json(), indent=2))
        print(f"saved {path}")
        return 0
    from sarathi.sim import workload as wl
    from sarathi.sim.runner import SimConfig, build_engine, run, write_trace

    cfg = SimConfig(model=ns.model, hardware=_hardware(ns.hardware), tensor_parallel_size=ns.tp,
                    pipeline_parallel_size=ns.pp, scheduler=ns.scheduler, chunk_size=ns.chunk_size,
                    max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
                    tile_size=ns.tile_size, block_size=ns.block_size, num_kv_blocks=ns.num_kv_blocks,
                    max_model_len=ns.max_model_len, dtype=ns.dtype)
    reqs = make_workload(ns)
    engine, clock = build_engine(cfg)
    t0 = time.perf_counter()
    res = run(engine, clock, reqs, progress=ns.progress)
    wall = time.perf_counter() - t0
    ex = engine.executor
    hw = ex.cost.hw  # type: ignore[attr-defined]
    print(f"{ns.model} on {hw.name} (TP {ns.tp} x PP {ns.pp}, {ex.dtype}), scheduler {ns.scheduler}, "  # type: ignore[attr-defined]
          f"budget {engine.scheduler.config.token_budget}, B {ns.max_num_seqs}, {engine.kv.num_blocks} KV "
          f"blocks x {engine.kv.block_size}")
    print(f"workload {ns.workload}: {wl.summarize(reqs)}")
    print(format_metrics(res.metrics))
    print(f"[simulated in {wall:.2f}s wall]")
    if ns.trace:
        print(f"trace: {write_trace(ex, ns.trace)}")  # type: ignore[arg-type]
    if ns.json:
        from sarathi.bench.common import save_json

        save_json({"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()},
                   "workload": wl.summarize(reqs), "metrics": res.metrics, "wall_s": wall}, ns.json)
    return 0


def _hardware(name: str) -> Any:
    """``local``: this machine's cached profile, measured (quick preset) and cached first if missing, as
    ``--chunk-size auto`` does; any other name is resolved by ``get_hardware`` later."""
    if name.lower() == "local":
        from sarathi.sim.calibrate import ensure_local_profile

        return ensure_local_profile()
    return name


def add_tune_parser(sub: Any, handlers: dict[str, Handler]) -> None:
    p = sub.add_parser("tune", help="recommend the token budget (chunk size) for a model, hardware and "
                                    "workload", description="Recommend the sarathi token budget: the paper's "
                                    "P:D rule rounded to the tile, capped by a TBT SLO, with the predicted "
                                    "throughput and latency of the choice and its neighbours.")
    p.add_argument("--model", default="llama-2-13b",
                   help="preset, HF config.json / folder or a checkpoint (.gguf) (default: %(default)s)")
    p.add_argument("--hardware", default="a6000",
                   help="a6000 | a100-80gb | h100 | h200 | local (this machine: its cached profile, measured "
                        "once if missing, as --chunk-size auto does) | spec .json (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", default="auto",
                   help="auto | float16 | bfloat16 | float32 (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="B, the largest batch (default: %(default)s)")
    p.add_argument("--tile-size", type=int, default=None, help="default: the hardware's matmul tile")
    p.add_argument("--prompt-len", type=int, default=1024, help="typical prompt tokens P")
    p.add_argument("--output-len", type=int, default=None, help="typical output tokens D (default P / "
                                                                "--pd-ratio)")
    p.add_argument("--pd-ratio", type=float, default=10.0)
    p.add_argument("--slo-tbt-ms", type=float, default=None, help="time-between-tokens target per step")
    p.add_argument("--num-requests", type=int, default=None, help="requests per simulated candidate "
                                                                  "(default 4 x B)")
    p.add_argument("--no-simulate", action="store_true", help="only the rules, no simulated candidates")
    handlers["tune"] = run_tune


def run_tune(ns: argparse.Namespace) -> int:
    from sarathi.sim.runner import SimConfig
    from sarathi.sim.tune import format_recommendation, recommend

    d = ns.output_len or max(1, round(ns.prompt_len / ns.pd_ratio))
    cfg = SimConfig(model=ns.model, hardware=_hardware(ns.hardware), tensor_parallel_size=ns.tp,
                    pipeline_parallel_size=ns.pp, max_num_seqs=ns.max_num_seqs, tile_size=ns.tile_size,
                    dtype=ns.dtype)
    r = recommend(cfg, ns.prompt_len, d, ns.slo_tbt_ms, ns.num_requests, simulate=not ns.no_simulate)
    print(f"{ns.model} on {ns.hardware} (TP {ns.tp} x PP {ns.pp}), B {ns.max_num_seqs}, P {ns.prompt_len}, "
          f"D {d}")
    print(format_recommendation(r, ns.prompt_len, d, ns.max_num_seqs, ns.slo_tbt_ms))
    return 0
