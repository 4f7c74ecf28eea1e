"""Soak a running server: many requests of random shapes under KV pressure, then check the books.

Each request is one of: a completion or a chat, streamed or not, ``n`` of 1 or 2, greedy or seeded,
and some clients disconnect after their first chunk. Prompts are random token ids and ``ignore_eos``
is set, so every request that is not disconnected has an exact expected usage: ``prompt_tokens`` is
the number of ids, ``completion_tokens`` is ``n * max_tokens``. Afterwards the server's ``/metrics``
must account for every sequence that was accepted (finished as stop/length/abort/error, none lost),
and show how much work preemption threw away (the recomputed-token share).

Used by ``tests/test_soak.py`` (a short run in CI) and ``sarathi bench soak`` (long runs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sarathi.bench.serve_client import check_loopback, sse_events


@dataclass
class SoakConfig:
    num_requests: int = 200
    concurrency: int = 24
    min_prompt_tokens: int = 8
    max_prompt_tokens: int = 300
    min_output_tokens: int = 2
    max_output_tokens: int = 24
    stream_frac: float = 0.5
    chat_frac: float = 0.25
    n2_frac: float = 0.2
    sampled_frac: float = 0.3  # temperature 0.8 with a seed; the rest greedy
    disconnect_frac: float = 0.1  # streamed requests whose client leaves after the first chunk
    vocab_size: int = 49152
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0


@dataclass
class SoakRequest:
    index: int
    chat: bool
    stream: bool
    n: int
    max_tokens: int
    prompt_ids: list[int]
    sampled: bool
    disconnect: bool
    status: int | None = None
    latency_s: float | None = None
    usage: dict[str, int] | None = None
    finish_reasons: list[str | None] = field(default_factory=list)
    problem: str | None = None  # why this request's outcome is wrong, if it is


def make_requests(cfg: SoakConfig) -> list[SoakRequest]:
    rng = random.Random(cfg.seed)
    reqs = []
    for i in range(cfg.num_requests):
        chat = rng.random() < cfg.chat_frac
        stream = rng.random() < cfg.stream_frac
        plen = rng.randint(cfg.min_prompt_tokens, cfg.max_prompt_tokens)
        # Avoid the low ids (special tokens such as <|im_start|>, which a chat template would add too).
        ids = [rng.randrange(100, cfg.vocab_size) for _ in range(plen)]
        reqs.append(SoakRequest(
            i, chat, stream, 2 if rng.random() < cfg.n2_frac else 1,
            rng.randint(cfg.min_output_tokens, cfg.max_output_tokens), ids, rng.random() < cfg.sampled_frac,
            stream and rng.random() < cfg.disconnect_frac))
    return reqs


def _body(r: SoakRequest, model: str, tokenizer_decode: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": r.max_tokens, "n": r.n, "ignore_eos": True,
                            "temperature": 0.8 if r.sampled else 0.0, "stream": r.stream}
    if r.sampled:
        body["seed"] = r.index
    if r.stream:
        body["stream_options"] = {"include_usage": True}
    if r.chat:
        body["messages"] = [{"role": "user", "content": tokenizer_decode(r.prompt_ids)}]
    else:
        body["prompt"] = r.prompt_ids
    return body


async def _one(client: Any, r: SoakRequest, body: dict[str, Any]) -> None:
    path = "/v1/chat/completions" if r.chat else "/v1/completions"
    t0 = time.perf_counter()
    try:
        if not r.stream:
            resp = await client.post(path, json=body)
            r.status = resp.status_code
            if resp.status_code == 200:
                data = resp.json()
                r.usage = data["usage"]
                r.finish_reasons = [c["finish_reason"] for c in data["choices"]]
            return
        async with client.stream("POST", path, json=body) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                return
            reasons: dict[int, str | None] = {}
            async for msg in sse_events(resp):
                if "error" in msg:
                    r.problem = f"error event: {msg['error']}"
                    return
                if msg.get("usage"):
                    r.usage = msg["usage"]
                for c in msg.get("choices") or []:
                    if c.get("finish_reason"):
                        reasons[c["index"]] = c["finish_reason"]
                if r.disconnect and msg.get("choices"):
                    return  # leave: closing the response closes the connection
            r.finish_reasons = [reasons.get(i) for i in range(r.n)]
    except Exception as e:  # noqa: BLE001 - a failed request is a finding, not a crash
        r.problem = f"{type(e).__name__}: {e}"
    finally:
        r.latency_s = time.perf_counter() - t0


def check(r: SoakRequest, prompt_tokens: int | None) -> None:
    """Set ``r.problem`` if the outcome is not exactly what this request must get."""
    if r.problem is not None:
        return
    if r.status != 200:
        r.problem = f"HTTP {r.status}"
    elif r.disconnect:
        return
    elif r.usage is None:
        r.problem = "no usage"
    elif r.usage["completion_tokens"] != r.n * r.max_tokens:
        r.problem = f"completion_tokens {r.usage['completion_tokens']} != {r.n} x {r.max_tokens}"
    elif prompt_tokens is not None and r.usage["prompt_tokens"] != prompt_tokens:
        r.problem = f"prompt_tokens {r.usage['prompt_tokens']} != {prompt_tokens}"
    elif r.finish_reasons != ["length"] * r.n:
        r.problem = f"finish reasons {r.finish_reasons}"


def _metric_sums(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + (f"{{{s.labels['finished_reason']}}}" if "finished_reason" in s.labels else "")
            sums[key] = sums.get(key, 0.0) + s.value
    return sums


async def run_soak(base_url: str, cfg: SoakConfig, tokenizer_decode: Any) -> dict[str, Any]:
    """Run the soak against ``base_url`` (loopback only) and return a JSON-able report."""
    import httpx

    check_loopback(base_url)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    reqs = make_requests(cfg)
    sem = asyncio.Semaphore(cfg.concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=cfg.timeout_s,
                                 limits=httpx.Limits(max_connections=cfg.concurrency + 4)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        before = _metric_sums((await client.get("/metrics")).text)

        async def run(r: SoakRequest) -> None:
            async with sem:
                await _one(client, r, _body(r, model, tokenizer_decode))

        t0 = time.perf_counter()
        await asyncio.gather(*(run(r) for r in reqs))
        duration = time.perf_counter() - t0
        # Aborts of disconnected clients land at the engine's next step: wait until it is idle.
        deadline = time.monotonic() + 60
        while True:
            after = _metric_sums((await client.get("/metrics")).text)
            if (after.get("sarathi_num_requests_running", 0) == 0
                    and after.get("sarathi_num_requests_waiting", 0) == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    for r in reqs:
        check(r, None if r.chat else len(r.prompt_ids))
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    finished = {k.split("{")[1].rstrip("}"): v for k, v in delta.items()
                if k.startswith("sarathi_requests_finished_total{")}
    computed = delta.get("sarathi_step_prompt_tokens_sum", 0) + delta.get("sarathi_step_decode_tokens_sum", 0)
    recomputed = delta.get("sarathi_recomputed_tokens_total", 0.0)
    lat = np.array([r.latency_s for r in reqs if r.status == 200 and not r.disconnect and r.latency_s])
    return {
        "config": asdict(cfg),
        "duration_s": round(duration, 2),
        "num_requests": len(reqs),
        "num_sequences": sum(r.n for r in reqs),
        "num_disconnected": sum(r.disconnect for r in reqs),
        "status_counts": {str(s): sum(r.status == s for r in reqs) for s in {r.status for r in reqs}},
        "problems": [{"index": r.index, "problem": r.problem} for r in reqs if r.problem],
        "finished_sequences": finished,
        "num_preemptions": delta.get("sarathi_num_preemptions_total", 0.0),
        "computed_tokens": computed,
        "recomputed_tokens": recomputed,
        "recomputed_share": recomputed / computed if computed else 0.0,
        "latency_s": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                      "max": float(lat.max())} if lat.size else {},
        "idle_after": after.get("sarathi_num_requests_running", 0) == 0,
        "kv_free_blocks_after": after.get("sarathi_kv_cache_free_blocks"),
    }


def summary(rep: dict[str, Any]) -> str:
    lat = rep["latency_s"]
    return (f"{rep['num_requests']} requests ({rep['num_sequences']} sequences, "
            f"{rep['num_disconnected']} disconnects) in {rep['duration_s']} s; statuses "
            f"{rep['status_counts']}; finished {rep['finished_sequences']}; problems {len(rep['problems'])}\n"
            f"preemptions {rep['num_preemptions']:.0f}, recomputed {rep['recomputed_tokens']:.0f} of "
            f"{rep['computed_tokens']:.0f} computed tokens ({100 * rep['recomputed_share']:.1f}%); "
            f"latency p50 {lat.get('p50', 0):.2f} s, p99 {lat.get('p99', 0):.2f} s")


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free 127.0.0.1 port in a daemon thread; yields its base URL."""
    import uvicorn

    # IPPROTO_TCP explicitly: asyncio turns TCP_NODELAY on only for sockets whose proto says TCP, and
    # without it Nagle + delayed ACKs add ~40 ms to every small response.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not srv.started:
        raise RuntimeError("the server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(60)
        sock.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SoakConfig()
    p.add_argument("--base-url", default=None,
                   help="soak this running server (loopback only); default: start one in-process")
    from sarathi.config import EngineArgs

    # The in-process server's engine flags; a small KV cache by default, to soak under KV pressure.
    EngineArgs.add_cli_args(p, defaults={"num_kv_blocks": 40, "chunk_size": 128})
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-output-tokens", type=int, default=d.max_output_tokens)
    p.add_argument("--disconnect-frac", type=float, default=d.disconnect_frac)
    p.add_argument("--workload-seed", type=int, default=0, help="seed of the random request mix")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))


def run(ns: argparse.Namespace) -> int:
    """``sarathi bench soak``: print the summary, save the report; exit 1 if any request went wrong."""
    import logging

    from sarathi.bench.common import loadavg, run_meta, save_json, set_threads

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    from sarathi.config import EngineArgs
    from sarathi.tokenizer import Tokenizer

    set_threads(ns.threads)

    cfg = SoakConfig(num_requests=ns.num_requests, concurrency=ns.concurrency,
                     max_prompt_tokens=ns.max_prompt_tokens, max_output_tokens=ns.max_output_tokens,
                     disconnect_frac=ns.disconnect_frac, seed=ns.workload_seed, api_key=ns.api_key)
    meta = run_meta("bench soak", {k: str(v) for k, v in vars(ns).items()})
    if ns.base_url:
        from sarathi.model.loader import resolve_model

        tok = Tokenizer.load(resolve_model(ns.model))
        rep = asyncio.run(run_soak(ns.base_url, cfg, tok.decode))
    else:
        from sarathi.engine import LLMEngine
        from sarathi.llm import LLM
        from sarathi.server import build_app

        llm = LLM.from_engine(LLMEngine(EngineArgs.from_cli(ns)))
        cfg.vocab_size = llm.engine.model_config.vocab_size
        with serve_in_thread(build_app(llm.engine, api_key=ns.api_key)) as url:
            rep = asyncio.run(run_soak(url, cfg, llm.engine.tokenizer.decode))
    meta["loadavg_end"] = loadavg()
    print(summary(rep))
    print(f"saved {save_json({'meta': meta, **rep}, ns.out)}")
    return 1 if rep["problems"] or not rep["idle_after"] else 0
