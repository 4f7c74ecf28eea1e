"""Online benchmark client for OpenAI-compatible servers (vLLM, sarathi's server, ...).

Sends streaming ``/v1/completions`` requests (prompt as token ids, or text) at Poisson or
gamma arrival times and reports latency metrics under the same key names as
``vllm bench serve`` (``mean_ttft_ms``, ``median_tpot_ms``, ``p99_itl_ms``,
``request_throughput``, ``output_throughput``, ``total_token_throughput``, ``completed``...),
plus goodput under TTFT/TPOT/E2EL SLOs and *generation stalls*: inter-token gaps longer
than a threshold (default 5x the median ITL), the symptom Sarathi-Serve's stall-free
batching removes.

Definitions (per request, as in vLLM): TTFT = first streamed token - send time; E2EL =
last chunk - send time; TPOT = (E2EL - TTFT) / (output_tokens - 1); ITL = gaps between
successive streamed chunks. Only loopback servers are accepted.

CLI: ``python -m sarathi.bench.serve_client --base-url http://127.0.0.1:8000 --num-prompts 8
--input-len 128 --output-len 32 --request-rate 2 --out R.json``
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from sarathi.bench.workloads import BenchRequest, fixed, gamma_arrivals, ranged, sharegpt_like

DEFAULT_PERCENTILES = (90.0, 99.0)


@dataclass
class RequestOutcome:
    """What the client observed for one request (times in seconds, perf_counter clock)."""

    prompt_len: int
    max_tokens: int
    success: bool = False
    start_time: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    generated_text: str = ""
    error: str = ""


def check_loopback(base_url: str) -> None:
    """Raise ``ValueError`` unless ``base_url`` points at this machine."""
    host = urlparse(base_url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"only loopback servers are allowed, got {base_url!r}")


def _pkey(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def _stats(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean/median/std/pXX of ``values_s`` (seconds) as ``*_{name}_ms`` keys."""
    arr = np.asarray(values_s, dtype=float) * 1000.0 if len(values_s) else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(arr.mean()),
        f"median_{name}_ms": float(np.median(arr)),
        f"std_{name}_ms": float(arr.std()),
    }
    for p in percentiles:
        out[f"p{_pkey(p)}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def compute_metrics(
    outcomes: Sequence[RequestOutcome],
    duration_s: float,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    slo_e2el_ms: float | None = None,
    stall_factor: float = 5.0,
    stall_threshold_ms: float | None = None,
) -> dict[str, Any]:
    """Aggregate per-request outcomes into ``vllm bench serve``-style metrics (pure function).

    A request is *good* (counts toward ``request_goodput``) when it succeeded and meets
    every SLO given. A *stall* is an ITL above ``stall_threshold_ms`` (default:
    ``stall_factor`` x the median ITL over all requests).
    """
    ok = [o for o in outcomes if o.success]
    ttfts = [o.ttft for o in ok]
    e2els = [o.latency for o in ok]
    itls = [g for o in ok for g in o.itl]
    tpot_all = [(o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0 for o in ok]
    tpots = [t for t, o in zip(tpot_all, ok, strict=True) if o.output_tokens > 1]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    dur = duration_s if duration_s > 0 else float("nan")

    m: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
    }
    slos = {"ttft": slo_ttft_ms, "tpot": slo_tpot_ms, "e2el": slo_e2el_ms}
    if any(v is not None for v in slos.values()):
        good = 0
        for o, tpot in zip(ok, tpot_all, strict=True):
            ms = {"ttft": o.ttft * 1e3, "tpot": tpot * 1e3, "e2el": o.latency * 1e3}
            good += all(lim is None or ms[k] <= lim for k, lim in slos.items())
        m["request_goodput"] = good / dur
        m["goodput_slos_ms"] = {k: v for k, v in slos.items() if v is not None}
    else:
        m["request_goodput"] = None
    for name, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        m.update(_stats(name, vals, percentiles))

    if stall_threshold_ms is None:
        stall_threshold_ms = stall_factor * float(np.median(itls)) * 1e3 if itls else math.inf
    thr = stall_threshold_ms / 1e3
    stalls = [[g for g in o.itl if g > thr] for o in ok]
    m.update(
        {
            "stall_threshold_ms": stall_threshold_ms,
            "num_stalls": sum(len(s) for s in stalls),
            "requests_with_stalls": sum(bool(s) for s in stalls),
            "total_stall_time_ms": sum(sum(s) for s in stalls) * 1e3,
            "max_itl_ms": max(itls) * 1e3 if itls else 0.0,
        }
    )
    m.update(_peaks(ok))
    return m


def _peaks(ok: Sequence[RequestOutcome]) -> dict[str, float]:
    """Peak per-second output token rate and peak concurrency (1-s buckets from the first send)."""
    if not ok:
        return {"max_output_tokens_per_s": 0.0, "max_concurrent_requests": 0}
    t0 = min(o.start_time for o in ok)
    n = int(max(o.start_time + o.latency for o in ok) - t0) + 1
    tokens = np.zeros(n)
    conc = np.zeros(n, dtype=int)
    for o in ok:
        times = o.start_time + o.ttft + np.concatenate([[0.0], np.cumsum(o.itl)])
        per_chunk = o.output_tokens / len(times)
        np.add.at(tokens, (times - t0).astype(int).clip(0, n - 1), per_chunk)
        first, last = int(o.start_time - t0), int(o.start_time + o.latency - t0)
        conc[first : last + 1] += 1
    return {"max_output_tokens_per_s": float(tokens.max()), "max_concurrent_requests": int(conc.max())}


async def sse_events(resp: Any) -> AsyncIterator[dict[str, Any]]:
    """The JSON messages of an OpenAI-style server-sent-event stream, up to ``data: [DONE]``."""
    async for line in resp.aiter_lines():
        line = line.strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def _send(client: Any, url: str, body: dict[str, Any], out: RequestOutcome) -> None:
    """Stream one completion into ``out`` (never raises for HTTP/stream errors)."""
    out.start_time = last = time.perf_counter()
    chunks = usage_tokens = id_tokens = 0
    text: list[str] = []
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for msg in sse_events(resp):
                if msg.get("usage"):
                    usage_tokens = msg["usage"].get("completion_tokens") or usage_tokens
                choices = msg.get("choices") or []
                if not choices:
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    out.ttft = now - out.start_time
                else:
                    out.itl.append(now - last)
                last = now
                chunks += 1
                text.append(choices[0].get("text") or "")
                id_tokens += len(choices[0].get("token_ids") or [])
        out.latency = last - out.start_time
        out.output_tokens = usage_tokens or id_tokens or chunks
        out.generated_text = "".join(text)
        out.success = chunks > 0
        if not out.success:
            out.error = "no tokens streamed"
    except Exception as exc:  # noqa: BLE001 - a failed request is data, not a crash
        out.error = f"{type(exc).__name__}: {exc}"


async def fetch_model_name(base_url: str, timeout_s: float = 10.0) -> str:
    """Return the first model id listed by ``GET /v1/models``."""
    import httpx

    check_loopback(base_url)
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        resp = await client.get(base_url.rstrip("/") + "/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]


async def wait_for_server(base_url: str, timeout_s: float = 300.0) -> bool:
    """Poll ``/v1/models`` until the server answers or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            await fetch_model_name(base_url, timeout_s=5.0)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            await asyncio.sleep(1.0)
    return False


async def run_serve_benchmark(
    base_url: str,
    model: str | None,
    requests: Sequence[BenchRequest],
    request_rate: float | None = math.inf,
    cv: float = 1.0,
    seed: int = 0,
    prompts_text: Sequence[str] | None = None,
    max_concurrency: int | None = None,
    extra_body: dict[str, Any] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    slo_e2el_ms: float | None = None,
    stall_factor: float = 5.0,
    max_requests: int = 10_000,
    max_duration_s: float = 1800.0,
    request_timeout_s: float = 600.0,
    progress: bool = True,
    include_details: bool = False,
) -> dict[str, Any]:
    """Replay ``requests`` against ``base_url`` and return the metrics dict.

    Arrival times come from ``request_rate`` (req/s; ``inf`` = all at once) with gamma
    gaps of coefficient of variation ``cv`` (1 = Poisson); ``request_rate=None`` uses each
    request's own ``arrival_time``. ``prompts_text`` sends text instead of token ids.
    ``extra_body`` is merged into every request (default ``{"ignore_eos": True}``, a vLLM
    extension that makes every request produce ``max_tokens``). Bounded: at most
    ``max_requests`` are sent, and requests still running after ``max_duration_s`` are
    cancelled and count as failed.
    """
    import httpx
    from tqdm.auto import tqdm

    check_loopback(base_url)
    requests = list(requests)[:max_requests]
    if prompts_text is not None and len(prompts_text) < len(requests):
        raise ValueError("prompts_text is shorter than requests")
    if model is None:
        model = await fetch_model_name(base_url)
    if request_rate is None:
        arrivals = [r.arrival_time - requests[0].arrival_time for r in requests] if requests else []
    else:
        arrivals = gamma_arrivals(request_rate, cv, len(requests), seed)
    url = base_url.rstrip("/") + "/v1/completions"
    extra = {"ignore_eos": True} if extra_body is None else extra_body
    outcomes = [RequestOutcome(r.prompt_len, r.max_tokens) for r in requests]
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, desc="requests")

    async def one(i: int, client: httpx.AsyncClient, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
        body = {
            "model": model,
            "prompt": prompts_text[i] if prompts_text is not None else requests[i].prompt_token_ids,
            "max_tokens": requests[i].max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        }
        if sem is None:
            await _send(client, url, body, outcomes[i])
        else:
            async with sem:
                await _send(client, url, body, outcomes[i])
        bar.update(1)

    limits = httpx.Limits(max_connections=max_concurrency or max(1, len(requests)))
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s), limits=limits) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(i, client, t0)) for i in range(len(requests))]
        _, pending = await asyncio.wait(tasks, timeout=max_duration_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
    bar.close()
    for o in outcomes:
        if not o.success and not o.error:
            o.error = "cancelled: max_duration_s reached"

    metrics = compute_metrics(
        outcomes, duration, percentiles, slo_ttft_ms, slo_tpot_ms, slo_e2el_ms, stall_factor
    )
    metrics.update(
        {
            "model": model,
            "base_url": base_url,
            "request_rate": "workload"
            if request_rate is None
            else (request_rate if math.isfinite(request_rate) else "inf"),
            "cv": cv,
            "max_concurrency": max_concurrency,
            "num_prompts": len(requests),
            "errors": sorted({o.error for o in outcomes if o.error})[:10],
        }
    )
    if include_details:
        metrics["requests"] = [asdict(o) for o in outcomes]
    return metrics


def _build_requests(args: argparse.Namespace) -> list[BenchRequest]:
    if args.dataset == "sharegpt":
        return sharegpt_like(args.num_prompts, args.vocab_size, args.seed, max_len=args.max_len)
    if args.dataset == "random":
        lo_p, hi_p = (
            int(args.input_len * (1 - args.range_ratio)),
            int(args.input_len * (1 + args.range_ratio)),
        )
        lo_d, hi_d = (
            int(args.output_len * (1 - args.range_ratio)),
            int(args.output_len * (1 + args.range_ratio)),
        )
        return ranged(
            (max(1, lo_p), hi_p), (max(1, lo_d), hi_d), args.num_prompts, args.vocab_size, args.seed
        )
    return fixed(args.input_len, args.output_len, args.num_prompts, args.vocab_size, args.seed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Online serving benchmark (OpenAI /v1/completions, streaming)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: first model of /v1/models")
    p.add_argument("--dataset", choices=["fixed", "random", "sharegpt"], default="fixed")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.5, help="random: lengths in len*(1 +- r)")
    p.add_argument("--max-len", type=int, default=2048, help="sharegpt: prompt + output cap")
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s (inf: all at once)")
    p.add_argument("--cv", type=float, default=1.0, help="arrival-gap coefficient of variation (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentiles", type=float, nargs="+", default=list(DEFAULT_PERCENTILES))
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--slo-e2el-ms", type=float, default=None)
    p.add_argument("--stall-factor", type=float, default=5.0)
    p.add_argument("--max-duration-s", type=float, default=1800.0)
    p.add_argument("--wait-for-server-s", type=float, default=0.0, help="poll the server first")
    p.add_argument("--details", action="store_true", help="include per-request records")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    async def run() -> dict[str, Any]:
        if args.wait_for_server_s > 0 and not await wait_for_server(args.base_url, args.wait_for_server_s):
            raise SystemExit(f"server at {args.base_url} did not come up in {args.wait_for_server_s}s")
        return await run_serve_benchmark(
            args.base_url,
            args.model,
            _build_requests(args),
            args.request_rate,
            args.cv,
            args.seed,
            max_concurrency=args.max_concurrency,
            percentiles=args.percentiles,
            slo_ttft_ms=args.slo_ttft_ms,
            slo_tpot_ms=args.slo_tpot_ms,
            slo_e2el_ms=args.slo_e2el_ms,
            stall_factor=args.stall_factor,
            max_duration_s=args.max_duration_s,
            include_details=args.details,
        )

    metrics = asyncio.run(run())
    text = json.dumps(metrics, indent=2, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
