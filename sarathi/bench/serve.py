"""``sarathi bench serve``: online latency benchmark of a running OpenAI-compatible server.

Wraps :func:`sarathi.bench.serve_client.run_serve_benchmark` (streaming ``/v1/completions``, prompts as
token ids, ``ignore_eos``) for ``sarathi serve`` or any other server (e.g. vLLM's), at one or more
request rates with Poisson (``--cv 1``) or gamma arrivals. Metric names follow ``vllm bench serve``
(``mean_ttft_ms``, ``p99_itl_ms``, ``request_throughput``, ``output_throughput``, ``request_goodput``
...). Added here:

- ``request_goodput_tbt``: requests per second that meet the TTFT SLO *and* whose every inter-token
  gap meets the TBT SLO (Sarathi-Serve's time-between-tokens; vLLM's ``request_goodput`` uses the
  per-request mean TPOT instead, which hides stalls);
- ``tbt_slo_attainment``: the fraction of all inter-token gaps within the TBT SLO.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from pathlib import Path
from typing import Any

from sarathi.bench.common import loadavg, run_meta, save_json

PERCENTILES = (50.0, 90.0, 99.0)


def tbt_goodput(details: list[dict[str, Any]], duration_s: float, slo_ttft_ms: float | None,
                slo_tbt_ms: float | None) -> dict[str, Any]:
    """Goodput under a TTFT SLO and a per-gap TBT SLO (either may be ``None``: not checked)."""
    ok = [d for d in details if d.get("success")]
    good = 0
    for d in ok:
        ttft_ok = slo_ttft_ms is None or d["ttft"] * 1e3 <= slo_ttft_ms
        tbt_ok = slo_tbt_ms is None or all(g * 1e3 <= slo_tbt_ms for g in d["itl"])
        good += ttft_ok and tbt_ok
    gaps = [g for d in ok for g in d["itl"]]
    within = sum(g * 1e3 <= slo_tbt_ms for g in gaps) if slo_tbt_ms is not None else len(gaps)
    return {
        "slo_ttft_ms": slo_ttft_ms, "slo_tbt_ms": slo_tbt_ms,
        "request_goodput_tbt": good / duration_s if duration_s > 0 else None,
        "good_requests_tbt": good,
        "tbt_slo_attainment": within / len(gaps) if gaps else None,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``sarathi bench serve`` (names follow ``vllm bench serve`` where one exists)."""
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (loopback only)")
    p.add_argument("--model", default=None, help="model name to send (default: first of /v1/models)")
    p.add_argument("--label", default=None, help="name in file names and plots (default: the model)")
    p.add_argument("--dataset", choices=["fixed", "random", "sharegpt"], default="fixed",
                   help="fixed: input/output lengths; random: +-range-ratio; "
                   "sharegpt: workloads.sharegpt_like")

    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.5)
    p.add_argument("--max-len", type=int, default=2048, help="sharegpt: prompt + output cap")
    p.add_argument("--vocab-size", type=int, default=49152, help="token ids are drawn below this")
    p.add_argument("--request-rate", type=float, nargs="+", default=[2.0],
                   help="requests/s (one run per value; inf = all at once)")
    p.add_argument("--cv", type=float, default=1.0, help="arrival-gap coefficient of variation (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT SLO")
    p.add_argument("--slo-tbt-ms", type=float, default=None, help="goodput: every inter-token gap SLO")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="vLLM-style goodput: mean TPOT SLO")
    p.add_argument("--stall-factor", type=float, default=5.0, help="stall = ITL > factor x median ITL")
    p.add_argument("--max-duration-s", type=float, default=1800.0)
    p.add_argument("--wait-for-server-s", type=float, default=0.0, help="poll /v1/models first")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _fname(label: str, rate: float) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label)
    return f"serve_{safe}_rate{'inf' if math.isinf(rate) else f'{rate:g}'}"


async def _run_all(ns: argparse.Namespace) -> list[dict[str, Any]]:
    from sarathi.bench import serve_client

    if ns.wait_for_server_s > 0 and not await serve_client.wait_for_server(ns.base_url, ns.wait_for_server_s):
        raise ValueError(f"server at {ns.base_url} did not answer within {ns.wait_for_server_s}s")
    model = ns.model or await serve_client.fetch_model_name(ns.base_url)
    requests = serve_client._build_requests(ns)
    runs = []
    for rate in ns.request_rate:
        load0 = loadavg()
        m = await serve_client.run_serve_benchmark(
            ns.base_url, model, requests, rate, ns.cv, ns.seed, max_concurrency=ns.max_concurrency,
            percentiles=PERCENTILES, slo_ttft_ms=ns.slo_ttft_ms, slo_tpot_ms=ns.slo_tpot_ms,
            stall_factor=ns.stall_factor, max_duration_s=ns.max_duration_s, progress=not ns.no_progress,
            include_details=True)
        m.update(tbt_goodput(m["requests"], m["duration"], ns.slo_ttft_ms, ns.slo_tbt_ms))
        m["loadavg_start"], m["loadavg_end"] = load0, loadavg()
        runs.append(m)
    return runs


SUMMARY_KEYS = ("completed", "failed", "request_throughput", "output_throughput", "total_token_throughput",
                "mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
                "mean_itl_ms", "p50_itl_ms", "p90_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p50_e2el_ms",
                "p90_e2el_ms", "p99_e2el_ms", "request_goodput", "request_goodput_tbt", "tbt_slo_attainment",
                "num_stalls", "requests_with_stalls", "max_itl_ms")


def run(ns: argparse.Namespace) -> list[Path]:
    """Run every rate, save one JSON per rate (+ a CDF plot); returns the JSON paths."""
    import logging

    from sarathi.bench.common import fmt

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

    meta = run_meta("bench serve", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()
                                    if k not in ("func", "command", "bench_command")})
    meta["torch_threads"] = None  # the client's threads say nothing about the server's
    runs = asyncio.run(_run_all(ns))
    label = (ns.label or runs[0]["model"]) if runs else "server"
    paths = []
    for rate, m in zip(ns.request_rate, runs):
        m["meta"], m["label"], m["dataset"] = meta, label, ns.dataset
        path = save_json(m, ns.out_dir / f"{_fname(label, rate)}.json")
        paths.append(path)
        print(f"\n== {label} @ {m['request_rate']} req/s ({path})")
        for k in SUMMARY_KEYS:
            print(f"{k:>26}: {fmt(m.get(k), 2)}")
    if not ns.no_plot and runs:
        from sarathi.bench.plots import plot_serve

        png = ns.out_dir / f"{_fname(label, ns.request_rate[0])}_cdf.png"
        plot_serve([(f"{label} @ {m['request_rate']}", m) for m in runs], png)
        print(f"plot: {png}")
    return paths
