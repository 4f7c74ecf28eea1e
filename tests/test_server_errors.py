"""Bad input, auth, a full waiting queue and engine failures: clear errors, and the server keeps serving."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

import tests.test_server as base

server = base.server  # the same module-scoped server fixture, started afresh for this module
API_KEY = base.API_KEY

GOOD = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
LONG_IDS = [504] * 9000  # longer than the model's 8192-token context

COMPLETION_CASES = [
    ("malformed-json", b'{"prompt": "x", ', "body"),
    ("not-an-object", b"[1, 2]", "body"),
    ("missing-prompt", {"max_tokens": 2}, "prompt"),
    ("prompt-wrong-type", {"prompt": 5}, "prompt"),
    ("empty-prompt-list", {"prompt": []}, "prompt"),
    ("max-tokens-wrong-type", {**GOOD, "max_tokens": "5"}, "max_tokens"),
    ("temperature-wrong-type", {**GOOD, "temperature": "hot"}, "temperature"),
    ("stream-wrong-type", {**GOOD, "stream": "yes"}, "stream"),
    ("prompt-too-long", {"prompt": LONG_IDS, "max_tokens": 1}, "prompt"),
    ("max-tokens-zero", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("max-tokens-over-context", {**GOOD, "max_tokens": 9000}, "max_tokens"),
    ("negative-temperature", {**GOOD, "temperature": -0.5}, "temperature"),
    ("top-p-zero", {**GOOD, "top_p": 0}, "top_p"),
    ("top-p-over-one", {**GOOD, "top_p": 1.5}, "top_p"),
    ("token-id-out-of-vocab", {"prompt": [1, 10**9]}, "prompt"),
    ("n-zero", {**GOOD, "n": 0}, "n"),
    ("stop-empty-string", {**GOOD, "stop": [""]}, "stop"),
    ("min-tokens-over-max", {**GOOD, "min_tokens": 5}, "min_tokens"),
    ("nan-temperature", b'{"prompt": "x", "temperature": NaN}', "temperature"),
]
CHAT_CASES = [
    ("missing-messages", {"max_tokens": 2}, "messages"),
    ("messages-not-a-list", {"messages": "hi"}, "messages"),
    ("message-without-role", {"messages": [{"content": "hi"}]}, "messages.0.role"),
    ("chat-too-long", {"messages": [{"role": "user", "content": "hi " * 9000}], "max_tokens": 1},
     "messages"),
    ("chat-bad-top-p", {"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "top_p"),
]


@pytest.fixture(scope="module")
def reference():
    """This module compares no texts: no reference outputs to compute before the server starts."""
    return {}


def _post(server: Any, path: str, body: Any, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **kw}
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=120)


def _assert_error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["code"] == status and err["type"]
    if param is not None:
        assert err["param"] == param and param.split(".")[0] in err["message"]


def _assert_still_serves(server: Any) -> None:
    r = _post(server, "/v1/completions", GOOD)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body,param", [c[1:] for c in COMPLETION_CASES],
                         ids=[c[0] for c in COMPLETION_CASES])
def test_bad_completion_request(server, body, param):
    _assert_error(_post(server, "/v1/completions", body), 400, param)


@pytest.mark.parametrize("body,param", [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES])
def test_bad_chat_request(server, body, param):
    _assert_error(_post(server, "/v1/chat/completions", body), 400, param)


def test_unknown_model_is_404(server):
    for path, body in [("/v1/completions", {**GOOD, "model": "gpt-4"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                 "model": "x"}),
                       ("/tokenize", {"prompt": "hi", "model": "gpt-4"})]:
        _assert_error(_post(server, path, body), 404, "model")


def test_server_survives_bad_input(server, llm):
    _assert_still_serves(server)
    assert not llm.engine.groups


def test_openai_client_sees_bad_request(server):
    import openai

    client = server.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=2, temperature=-1)
    assert "temperature" in str(e.value)


def test_api_key(server):
    r = httpx.post(f"{server.url}/v1/completions", json=GOOD)
    _assert_error(r, 401, None)
    _assert_error(_post(server, "/v1/completions", GOOD, Authorization="Bearer wrong"), 401, None)
    _assert_error(httpx.get(f"{server.url}/v1/models"), 401, None)
    assert httpx.get(f"{server.url}/health").status_code == 200  # health and metrics need no key
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    _assert_error(_post(server, "/v1/nowhere", GOOD), 404, None)


def test_full_waiting_queue_gives_429_and_keeps_accepted(server, llm, monkeypatch):
    aeng = server.aengine
    monkeypatch.setattr(aeng, "max_waiting_requests", 1)
    entered, release = base.gate_executor(monkeypatch, llm.engine)
    got: dict[str, Any] = {}

    def send(name: str) -> threading.Thread:
        t = threading.Thread(target=lambda: got.update({name: _post(server, "/v1/completions", GOOD)}))
        t.start()
        return t

    threads = [send("first")]
    try:
        assert entered.wait(60), "the first request never reached the engine"
        assert aeng.num_waiting == 0  # scheduled: blocked inside its first step
        threads.append(send("second"))  # accepted, waits behind the blocked step
        deadline = time.monotonic() + 60
        while aeng.num_waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert aeng.num_waiting == 1
        r = _post(server, "/v1/completions", GOOD)
        _assert_error(r, 429, None)
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        release.set()
        for t in threads:
            t.join(120)
    for name in ("first", "second"):  # nothing accepted is lost
        assert got[name].status_code == 200 and got[name].json()["usage"]["completion_tokens"] == 2
    monkeypatch.undo()
    _assert_still_serves(server)
    assert server.metric("sarathi_requests_rejected_total") >= 1


def fail_requests_with_seed_666(monkeypatch: Any, engine: Any) -> None:
    """Make every model step that samples for a request with seed 666 raise."""
    real = engine.executor.execute

    def flaky(plan: Any) -> Any:
        if any(s.sample is not None and s.sample.seed == 666 for s in plan.seqs):
            raise RuntimeError("injected model failure")
        return real(plan)

    monkeypatch.setattr(engine.executor, "execute", flaky)


def test_engine_failure_gives_500_and_server_keeps_serving(server, llm, monkeypatch, caplog):
    engine = llm.engine
    fail_requests_with_seed_666(monkeypatch, engine)
    with caplog.at_level("ERROR", logger="sarathi"):
        r = _post(server, "/v1/completions", {**GOOD, "seed": 666})
    _assert_error(r, 500, None)
    assert any(rec.exc_info for rec in caplog.records), "the traceback should be logged"
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**GOOD, "seed": 666, "stream": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as s:
        lines = [line for line in s.iter_lines() if line]
    assert '"error"' in lines[0] and lines[-1] == "data: [DONE]"
    _assert_still_serves(server)
    assert server.metric("sarathi_requests_finished_total", finished_reason="error") == 2
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_failing_request_does_not_fail_concurrent_innocents(server, llm, monkeypatch):
    """A request that breaks the model step gets its 500; the innocents batched with it get 200 and the
    same greedy text they get alone."""
    prompts = ["The capital of France is", "Water boils at", "Once upon a time,", "def add(a, b):"]
    body = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    alone = [_post(server, "/v1/completions", {**body, "prompt": p}).json()["choices"][0]["text"]
             for p in prompts]
    engine = llm.engine
    fail_requests_with_seed_666(monkeypatch, engine)
    entered, release = base.gate_executor(monkeypatch, engine)  # hold the first step: all join one batch
    results: dict[int, httpx.Response] = {}
    bodies = [{**body, "prompt": p} for p in prompts]
    bodies.insert(2, {**body, "prompt": "Tell me a story", "temperature": 0.8, "seed": 666})

    def send(i: int, b: dict[str, Any]) -> None:
        results[i] = _post(server, "/v1/completions", b)

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    try:
        assert entered.wait(60)
        deadline = time.monotonic() + 30
        while server.aengine.num_in_flight < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        release.set()
        for t in threads:
            t.join(120)
    _assert_error(results.pop(2), 500, None)
    texts = [results[i].json()["choices"][0]["text"] for i in sorted(results)]
    assert [r.status_code for r in results.values()] == [200] * len(prompts)
    assert texts == alone
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("field,value", [("allowed_token_ids", [1, 2]), ("bad_words", ["x"]),
                                         ("use_beam_search", True), ("length_penalty", 0.5),
                                         ("truncate_prompt_tokens", 8)])
def test_unimplemented_vllm_fields_are_400_not_ignored(server, field, value):
    """Known vLLM fields we do not implement: a 400 naming them, never silently dropped; their
    defaults (which some clients always send) are accepted."""
    _assert_error(_post(server, "/v1/completions", {**GOOD, field: value}), 400, field)
    default = {"allowed_token_ids": None, "bad_words": [], "use_beam_search": False, "length_penalty": 1.0,
               "truncate_prompt_tokens": None}[field]
    assert _post(server, "/v1/completions", {**GOOD, field: default}).status_code == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _assert_error(_post(server, "/v1/chat/completions", {**chat, "echo": True}), 400, "echo")


def test_prefix_cache_hits_show_in_usage_and_metrics(server):
    """A repeated long prompt is served from the prefix cache: usage reports cached tokens (OpenAI's
    prompt_tokens_details) and /metrics counts the hits."""
    body = {"prompt": "The history of bread begins in the Neolithic. " * 12, "max_tokens": 2,
            "temperature": 0}
    first = _post(server, "/v1/completions", body).json()
    again = _post(server, "/v1/completions", body).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < again["usage"]["prompt_tokens"]
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    hits = [line for line in text.splitlines() if line.startswith("sarathi_prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= cached
