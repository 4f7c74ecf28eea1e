"""Pipeline parallelism: PP=2 (two local ranks over gloo) gives HF's greedy tokens under every policy,
keeps at most N micro-batches in flight with no request waiting for a token in two of them, accounts
its bubbles, and turns a killed rank into a clear error within the timeout (also under ``sarathi serve``:
500/503 with an OpenAI error body, then a clean exit on SIGTERM)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from sarathi import SamplingParams
from sarathi.executor.pipeline import PipelineError, stage_ranges
from sarathi.scheduler import ModelOutput, StepPlan
from tests.conftest import NUM_NEW

GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
TIMEOUT = 10


@pytest.fixture(scope="module")
def pp_llm():
    """One PP=2 engine for the module (starting the second rank costs seconds); the last test kills it."""
    from sarathi import LLM

    llm = LLM(dtype="float32", kv_cache_memory="256MiB", pipeline_parallel_size=2,
              pipeline_timeout=TIMEOUT, threads=1)
    yield llm
    llm.engine.shutdown()


class InFlightCheck:
    """Wraps ``submit``: records the most plans in flight and any request whose token is still due in
    a plan in flight being scheduled again."""

    def __init__(self, engine) -> None:
        self.engine, self.inner = engine, engine.executor.submit
        self.max_seen = 0
        self.violations: list[str] = []

    def __call__(self, plan: StepPlan) -> Future[ModelOutput]:
        in_flight = [f.plan for f in self.engine._in_flight]
        self.max_seen = max(self.max_seen, len(in_flight) + 1)
        if len(in_flight) >= self.engine.executor.max_in_flight:
            self.violations.append(f"step {plan.step_id}: more than N plans in flight")
        due = {s.req_id for p in in_flight for s in p.seqs if s.sample is not None}
        if due & {s.req_id for s in plan.seqs}:
            self.violations.append(f"step {plan.step_id} reschedules {due & {s.req_id for s in plan.seqs}}")
        return self.inner(plan)


@pytest.fixture
def pp_engine(pp_llm, monkeypatch):
    eng = pp_llm.engine
    check = InFlightCheck(eng)
    monkeypatch.setattr(eng.executor, "submit", check)
    eng.check = check
    yield eng
    eng.abort_request(list(eng.groups))
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.kv.num_free_blocks == eng.kv.num_blocks, "a test leaked KV blocks"
    eng.reconfigure(scheduler="sarathi", chunk_size=None, num_kv_blocks=None, block_size=16)


def test_stage_ranges() -> None:
    assert stage_ranges(30, 2) == [(0, 15), (15, 30)]
    assert stage_ranges(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert stage_ranges(30, 2, "20,10") == [(0, 20), (20, 30)]
    with pytest.raises(ValueError, match="pipeline_stages"):
        stage_ranges(30, 2, "20,9")


def test_pipeline_args_checked_before_loading() -> None:
    from sarathi import EngineArgs
    from sarathi.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="pipeline_stages"):
        EngineArgs(pipeline_parallel_size=2, pipeline_stages="30").check()
    with pytest.raises(InvalidArgument, match="pipeline_parallel_size"):
        EngineArgs(pipeline_parallel_size=0).check()


def test_each_stage_holds_only_its_layers(pp_llm) -> None:
    ex = pp_llm.engine.executor
    model = ex.stage.model
    assert ex.ranges == [(0, 15), (15, 30)] and ex.max_in_flight == 2
    assert len(model.layers) == 15 and model.embed_tokens is not None
    assert model.lm_head is None and model.norm is None  # final norm + LM head live on the last stage
    assert len(ex.stage.kv_caches) == 15


@pytest.mark.parametrize("config", [
    dict(scheduler="sarathi", chunk_size=32),
    dict(scheduler="sarathi", chunk_size=16, num_kv_blocks=8),  # preemption across stages
    dict(scheduler="vllm", num_kv_blocks=48, block_size=4),  # a baseline preempting across stages
    dict(scheduler="orca"),
    dict(scheduler="request_level"),
], ids=["sarathi", "sarathi-preempt", "vllm-preempt", "orca", "request_level"])
def test_pp2_greedy_tokens_equal_hf(pp_engine, pp_llm, hf_reference, config) -> None:
    pp_engine.reconfigure(**config)
    outs = pp_llm.generate([{"prompt_token_ids": ids} for ids, _ in hf_reference], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [ref for _, ref in hf_reference]
    assert pp_engine.check.violations == []
    assert pp_engine.check.max_seen <= 2
    if config["scheduler"] == "sarathi":
        assert pp_engine.check.max_seen == 2, "the pipeline never held two micro-batches"
    if "num_kv_blocks" in config:
        assert pp_engine.scheduler.num_preemptions > 0
    rep = pp_engine.executor.bubble_report()
    assert [s["micro_batches"] for s in rep["stages"]] == [rep["stages"][0]["micro_batches"]] * 2
    assert rep["pending_s"] > 0 and all(0 <= s["bubble_fraction"] < 1 for s in rep["stages"])
    if config["scheduler"] == "sarathi":  # the bubble numbers reach /metrics
        from prometheus_client.parser import text_string_to_metric_families

        from sarathi.server.metrics import ServerMetrics

        m = ServerMetrics("pp")
        m.record_pipeline(rep)
        got = {(s.name, s.labels.get("stage")): s.value
               for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
        assert got[("sarathi_pipeline_bubble_fraction", "1")] == rep["stages"][1]["bubble_fraction"]
        assert got[("sarathi_pipeline_bubble_seconds", None)] == rep["bubble_s"]


def test_abort_in_flight_across_stages(pp_engine, hf_reference) -> None:
    pp_engine.reconfigure(chunk_size=16)
    (ids0, ref0), (ids3, _) = hf_reference[0], hf_reference[3]
    pp_engine.add_request("keep", {"prompt_token_ids": ids0}, GREEDY)
    pp_engine.add_request("drop", {"prompt_token_ids": ids3}, GREEDY)
    for _ in range(3):
        pp_engine.step()
    drop = pp_engine.scheduler.requests["drop"]
    assert drop.num_in_flight > 0
    pp_engine.abort_request("drop")
    final = {}
    while pp_engine.has_unfinished_requests():
        for out in pp_engine.step():
            final[out.request_id] = out
    assert set(final) == {"keep"} and final["keep"].outputs[0].token_ids == ref0
    assert pp_engine.kv.num_free_blocks == pp_engine.kv.num_blocks


def test_pp2_structured_outputs_and_prompt_logprobs_equal_local(pp_engine, pp_llm, llm) -> None:
    """The last rank applies grammar masks and computes prompt logprobs: same answers as one process."""
    from sarathi import StructuredOutputsParams

    pp_engine.reconfigure(chunk_size=16)
    schema = {"type": "object", "properties": {"name": {"enum": ["Ann", "Bob", "Eve"]},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    params = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=so),
              SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2)]
    prompts = ["Describe a person as JSON:", "The capital of France is Paris, and the capital of Italy is"]
    pp, local = (m.generate(prompts, params, use_tqdm=False) for m in (pp_llm, llm))
    assert pp[0].outputs[0].token_ids == local[0].outputs[0].token_ids
    obj = json.loads(pp[0].outputs[0].text)
    assert set(obj) == {"name", "age"} and obj["name"] in ("Ann", "Bob", "Eve")
    assert isinstance(obj["age"], int)
    assert pp[1].outputs[0].token_ids == local[1].outputs[0].token_ids
    got, want = pp[1].prompt_logprobs, local[1].prompt_logprobs
    assert got[0] is None and len(got) == len(want) == len(pp[1].prompt_token_ids)
    for g, w in zip(got[1:], want[1:]):
        assert g.keys() == w.keys()
        assert all(abs(g[t].logprob - w[t].logprob) < 1e-4 for t in g)


def test_torchrun_loopback_example() -> None:
    """The README's torchrun example (two ranks over 127.0.0.1) prints the same greedy text as PP=1."""
    with socket.socket() as sock:  # a free loopback port for torchrun's rendezvous store
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           "-m", "sarathi.cli", "generate", "The capital of France is", "--pipeline-parallel-size", "2",
           "--threads", "1", "--max-tokens", "4", "--dtype", "float32", "--kv-cache-memory", "16MiB"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                         env=dict(os.environ, TQDM_DISABLE="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("The capital of France is Paris."), res.stdout
    assert "pipeline executor" in res.stderr


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the body runs longer than ``seconds``."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"test ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_killed_rank_gives_a_clear_error_within_the_timeout(pp_llm, hf_reference) -> None:
    """Runs last: it breaks the module's engine."""
    with deadline(TIMEOUT + 30):
        _kill_and_expect_error(pp_llm, hf_reference)


def _kill_and_expect_error(pp_llm, hf_reference) -> None:
    eng = pp_llm.engine
    worker = eng.executor.procs[0]
    worker.kill()
    worker.wait()
    t0 = time.monotonic()
    with pytest.raises(PipelineError, match=r"rank 1 \(layers 15-29\) exited"):
        # the requests of plans in flight fail with the error; the next step raises it
        for _ in range(3):
            outs = pp_llm.generate([{"prompt_token_ids": ids} for ids, _ in hf_reference[:2]], GREEDY)
            assert all(o.finished and o.outputs[0].finish_reason == "error" for o in outs)
    assert time.monotonic() - t0 < TIMEOUT + 5
    eng.shutdown()
    assert all(p.poll() is not None for p in eng.executor.procs)



def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc)."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def test_server_answers_503_after_a_rank_dies(tmp_path) -> None:
    """``sarathi serve`` with PP=2: kill rank 1; the request in flight gets a 500/503 OpenAI error body
    within the pipeline timeout, later ones a 503 at once, /health turns 503, SIGTERM still exits 0 and
    the --trace file (written at shutdown) holds both stage tracks."""
    import json

    port, trace = _free_port(), tmp_path / "serve_trace.json"
    log = open(tmp_path / "serve.log", "w+")
    env = {k: v for k, v in os.environ.items() if k != "SARATHI_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sarathi.cli", "serve", "--port", str(port), "--dtype", "float32",
         "--kv-cache-memory", "32MiB", "--log-level", "warning", "--pipeline-parallel-size", "2",
         "--pipeline-timeout", "5", "--threads", "1", "--trace", str(trace)],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    ranks: list[int] = []
    try:
        with deadline(240):
            _rank_dies_under_the_server(proc, f"http://127.0.0.1:{port}", ranks)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        events = json.loads(trace.read_text())["traceEvents"]
        spans = [e for e in events if e["ph"] == "X"]
        assert {e["tid"] for e in spans} == {0, 1} and {e["cat"] for e in spans} == {"compute", "comm"}
    finally:
        for pid in ranks:  # (already killed unless the test failed first)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.seek(0)
        print(log.read()[-5000:])
        log.close()


def _rank_dies_under_the_server(proc: subprocess.Popen, url: str, ranks: list[int]) -> None:
    import threading

    import httpx

    while True:
        assert proc.poll() is None, "the server exited early"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    ranks += _children(proc.pid)
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4,
                                                    "temperature": 0}, timeout=60)
    assert ok.status_code == 200 and len(ranks) == 1, (ok.text, ranks)
    got: dict[str, httpx.Response] = {}
    body = {"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    long = threading.Thread(target=lambda: got.update(r=httpx.post(f"{url}/v1/completions", json=body,
                                                                   timeout=60)))
    long.start()
    time.sleep(1.0)  # the long request is running
    os.kill(ranks[0], signal.SIGKILL)
    t0 = time.monotonic()
    long.join(30)
    assert not long.is_alive(), "the request in flight hangs"
    r = got["r"]
    assert r.status_code in (500, 503), r.text
    assert time.monotonic() - t0 < 5 + 10
    err = r.json()["error"]
    assert "pipeline" in err["message"] and err["type"] in ("server_error", "service_unavailable"), err
    t1 = time.monotonic()
    again = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert again.status_code == 503 and time.monotonic() - t1 < 5, again.text
    err = again.json()["error"]
    assert err["type"] == "service_unavailable" and "rank 1" in err["message"], err
    health = httpx.get(f"{url}/health", timeout=10)
    assert health.status_code == 503 and "rank 1" in health.json()["reason"]
