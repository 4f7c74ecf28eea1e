"""The OpenAI-compatible server, started for real on a loopback port and driven by openai and httpx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sarathi import SamplingParams

API_KEY = "test-key"
TOPICS = ["The capital of France is", "Water boils at", "The largest planet in the solar system is",
          "def add(a, b):\n    return", "My favourite colour is", "Once upon a time, in a small village,",
          "The speed of light is", "To make a cup of tea, first"]
# 32 prompts of different lengths, each with its own max_tokens (4..16).
CONCURRENT = [(TOPICS[i % 8] if i < 8 else f"Fact number {i}. " * (i % 5 + 1) + TOPICS[i % 8], 4 + i * 5 % 13)
              for i in range(32)]
CHAT = [{"role": "user", "content": "Name three colours."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    app: Any

    @property
    def aengine(self) -> Any:
        return self.app.state.async_engine

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"},
                            timeout=kw.pop("timeout", 120), **kw)

    def openai(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, timeout=120, max_retries=0)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def metric(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, lab), v in self.metrics().items() if n == name and want <= set(lab))


@pytest.fixture(scope="module")
def reference(llm):
    """LLM.generate's greedy outputs, computed on the same engine before the server starts."""
    params = [SamplingParams(temperature=0.0, max_tokens=mt) for _, mt in CONCURRENT]
    outs = llm.generate([p for p, _ in CONCURRENT], params)
    chat = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=16))[0]
    return {"concurrent": [o.outputs[0].text for o in outs], "chat": chat.outputs[0].text}


@contextlib.contextmanager
def running_server(engine: Any, **build_kw: Any) -> Iterator[Server]:
    """uvicorn on a free 127.0.0.1 port, in a background thread, around ``engine`` (whose thread then
    owns the engine until the server stops); checks that nothing is left running afterwards."""
    from sarathi.bench.soak import serve_in_thread
    from sarathi.server import build_app

    app = build_app(engine, **{"api_key": API_KEY, **build_kw})
    with serve_in_thread(app) as url:
        yield Server(url, app)
    assert not engine.groups and engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.fixture(scope="module")
def server(llm, reference):
    """The session's engine behind a real server (started only once ``reference`` has used it)."""
    with running_server(llm.engine) as srv:
        yield srv


def gate_executor(monkeypatch: Any, engine: Any) -> tuple[threading.Event, threading.Event]:
    """Make every engine step wait for ``release``; ``entered`` is set when a step is blocked."""
    entered, release = threading.Event(), threading.Event()
    real = engine.executor.execute

    def gated(batch: Any) -> Any:
        entered.set()
        release.wait(60)
        return real(batch)

    monkeypatch.setattr(engine.executor, "execute", gated)
    return entered, release


def _sse(lines: Any) -> list[Any]:
    """Parse SSE ``data:`` lines; the last one must be ``[DONE]``."""
    events = [line[len("data: "):] for line in lines if line]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def test_models_health(server, llm):
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [llm.engine.model_name]


def test_completion_stream_equals_nonstream_equals_generate(server, reference):
    client = server.openai()
    prompt, max_tokens = CONCURRENT[0]
    ref = reference["concurrent"][0]
    full = client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                     max_tokens=max_tokens, temperature=0)
    assert full.choices[0].text == ref
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.completions.create(model=full.model, prompt=prompt, max_tokens=max_tokens,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_chat_stream_equals_nonstream(server, reference):
    client = server.openai()
    model = client.models.list().data[0].id
    full = client.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == reference["chat"]
    stream = client.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference["chat"]
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert full.usage.completion_tokens == 16 or full.choices[0].finish_reason == "stop"


def test_raw_sse_and_stop_string_holdback(server):
    """Raw SSE with httpx; a stop string is never half-streamed."""
    body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "stop": ["\n\n"]}
    with server.client() as c:
        full = c.post("/v1/completions", json=body).json()
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            chunks = _sse(r.iter_lines())
    assert full["choices"][0]["finish_reason"] == "stop" and "\n\n" not in full["choices"][0]["text"]
    assert all(ch["object"] == "text_completion" and ch["id"] == chunks[0]["id"] for ch in chunks)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == full["choices"][0]["text"]


def test_prompt_forms_n_echo_logprobs(server, llm):
    tok = llm.engine.tokenizer
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": [tok.encode("Hi"), tok.encode("The sky is")], "n": 2,
                                            "max_tokens": 3, "temperature": 0.8, "seed": 5, "logprobs": 2,
                                            "ignore_eos": True, "top_k": 50}).json()
        assert [ch["index"] for ch in r["choices"]] == [0, 1, 2, 3]
        for ch in r["choices"]:
            lp = ch["logprobs"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
            assert "".join(lp["tokens"]) == ch["text"]
        assert r["usage"]["completion_tokens"] == 12
        e = c.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 3, "temperature": 0,
                                            "echo": True}).json()
        assert e["choices"][0]["text"].startswith("The sky is")
        s = c.post("/v1/completions", json={"prompt": [tok.encode("Hi")], "max_tokens": 5, "temperature": 0,
                                            "min_tokens": 5, "stop_token_ids": [0], "ignore_eos": True})
        assert s.status_code == 200 and s.json()["usage"]["completion_tokens"] == 5


def test_penalties_and_logit_bias_through_openai_client(server, llm):
    """OpenAI's penalty fields and vLLM's extras reach the sampler (no longer refused, never ignored)."""
    client = server.openai()
    model, counting = "SmolLM2-135M-Instruct", "1, 2, 1, 2, 1, 2,"
    forced = llm.engine.tokenizer.encode(" banana")[0]
    out = client.completions.create(model=model, prompt="My favourite fruit is", max_tokens=4, temperature=0,
                                    logit_bias={str(forced): 100})
    assert out.choices[0].text == " banana" * 4
    plain = client.completions.create(model=model, prompt=counting, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    penalized = client.completions.create(
        model=model, prompt=counting, max_tokens=12, temperature=0, frequency_penalty=2.0,
        presence_penalty=1.0, extra_body={"ignore_eos": True, "repetition_penalty": 1.2, "min_p": 0.1})
    assert penalized.choices[0].text != plain.choices[0].text
    assert penalized.usage.completion_tokens == 12


def test_utility_routes(server, llm):
    tok = llm.engine.tokenizer
    with server.client() as c:
        assert c.get("/ping").status_code == 200 and c.post("/ping").status_code == 200
        from sarathi import __version__

        assert c.get("/version").json() == {"version": __version__}
        t = c.post("/tokenize", json={"prompt": "The sky is blue"}).json()
        assert t["tokens"] == tok.encode("The sky is blue") and t["count"] == len(t["tokens"])
        assert t["max_model_len"] == llm.engine.max_model_len
        chat = c.post("/tokenize", json={"messages": CHAT}).json()
        text = tok.apply_chat_template(CHAT)
        assert chat["tokens"] == tok.encode(text, False)
        assert c.post("/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": "The sky is blue"}
        bad = c.post("/detokenize", json={"tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        both = c.post("/tokenize", json={"prompt": "x", "messages": CHAT})
        assert both.status_code == 400 and both.json()["error"]["param"] == "prompt"
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}).status_code == 401  # needs the key


def test_32_concurrent_streams(server, reference):
    from openai import AsyncOpenAI

    before = server.metric("sarathi_requests_finished_total")

    async def run() -> list[str]:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=300, max_retries=0)

        async def one(prompt: str, max_tokens: int) -> str:
            stream = await client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt,
                                                     max_tokens=max_tokens, temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(p, mt) for p, mt in CONCURRENT))
        finally:
            await client.close()

    texts = asyncio.run(asyncio.wait_for(run(), 600))
    assert texts == reference["concurrent"]
    assert server.metric("sarathi_requests_finished_total") == before + 32


def _wait_for(cond: Any, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_disconnect_mid_stream_frees_blocks(server, llm):
    kv = llm.engine.kv
    aborted = server.metric("sarathi_requests_finished_total", finished_reason="abort")
    body = {"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with server.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == 2:
                break
        assert kv.num_free_blocks < kv.num_blocks  # the request holds blocks while it runs
    assert _wait_for(lambda: server.metric("sarathi_requests_finished_total",
                                           finished_reason="abort") == aborted + 1)
    assert _wait_for(lambda: server.metric("sarathi_kv_cache_free_blocks") == kv.num_blocks)
    assert server.metric("sarathi_num_requests_running") == 0 and server.aengine.num_in_flight == 0


def test_disconnect_non_stream_aborts(server, llm):
    aborted = server.metric("sarathi_requests_finished_total", finished_reason="abort")
    body = {"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    with server.client(timeout=3) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=body)
    assert _wait_for(lambda: server.metric("sarathi_requests_finished_total",
                                           finished_reason="abort") == aborted + 1)
    assert _wait_for(lambda: llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks)


def test_metrics_parse_and_move(server):
    before = server.metrics()
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "One two three", "max_tokens": 5, "temperature": 0,
                                            "ignore_eos": True}).json()
    prompt_tokens = r["usage"]["prompt_tokens"]
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        want = set(labels.items())
        pick = lambda d: sum(v for (n, lab), v in d.items() if n == name and want <= set(lab))  # noqa: E731
        return pick(after) - pick(before)

    assert delta("sarathi_requests_finished_total", finished_reason="length") == 1
    assert delta("sarathi_prompt_tokens_total") == prompt_tokens
    assert delta("sarathi_generation_tokens_total") == 5
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"sarathi_{h}_count") == 1
    assert delta("sarathi_time_between_tokens_seconds_count") == 4
    assert delta("sarathi_steps_total") >= 5
    assert delta("sarathi_step_prompt_tokens_sum") >= prompt_tokens
    assert delta("sarathi_step_decode_tokens_sum") >= 4
    for g in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "mixed_steps_total",
              "num_preemptions_total", "last_step_prompt_tokens", "last_step_decode_tokens"):
        assert any(n == f"sarathi_{g}" for n, _ in after), g


def test_piggybacked_decodes_show_in_metrics(server, monkeypatch):
    """A prompt arriving while another request decodes runs in the same step (SARATHI's mixed batch)."""
    mixed = server.metric("sarathi_mixed_steps_total")
    long_prompt = "The history of the world is long. " * 20
    second: dict[str, Any] = {}
    body = {"prompt": "Count to twenty:", "max_tokens": 30, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with server.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # now decoding
        entered, release = gate_executor(monkeypatch, server.aengine.engine)
        post = threading.Thread(target=lambda: second.update(r=server.client().post(
            "/v1/completions", json={"prompt": long_prompt, "max_tokens": 2, "temperature": 0})))
        try:
            assert entered.wait(60)
            post.start()
            assert _wait_for(lambda: server.aengine.num_in_flight == 2)
        finally:
            release.set()
        rest = [line for line in lines if line]
        if post.ident is not None:
            post.join(120)
    assert rest[-1] == "data: [DONE]" and second["r"].status_code == 200
    assert server.metric("sarathi_mixed_steps_total") >= mixed + 1


def test_cli_serve_sigterm_exits_cleanly(tmp_path):
    """``sarathi serve`` in a subprocess: an in-flight stream finishes on SIGTERM and the exit code is 0."""
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sarathi.cli", "serve", "--port", str(port), "--dtype", "float32",
         "--kv-cache-memory", "32MiB", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "SARATHI_API_KEY"})
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, "server exited early"
            try:
                return httpx.get(f"{url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        assert _wait_for(up, 300), "server did not come up"
        body = {"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True, "temperature": 0,
                "stream": True}
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 1:
                    proc.send_signal(signal.SIGTERM)
        chunks = _sse(lines)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.seek(0)
        print(log.read())
        log.close()
