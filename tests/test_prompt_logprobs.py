"""Prompt logprobs (vLLM's ``prompt_logprobs``), ``echo`` with ``logprobs`` and ``best_of``, on the real
default model in float32: prompt logprobs equal HF transformers' log-softmax for every chunk size and under
preemption, and reach the client through the server."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from sarathi import SamplingParams
from sarathi.errors import InvalidArgument
from tests.conftest import NUM_NEW, PROMPTS
from tests.test_server import running_server

TOL = 1e-4
SHORT = "The capital of France is Paris, and the capital of Germany is"


@pytest.fixture(scope="module")
def hf_logprobs(llm, hf_model):
    """HF's log-softmax over the vocabulary at every position of each prompt (ours tokenizes)."""
    tok = llm.get_tokenizer()
    out = {}
    with torch.inference_mode():
        for p in [*PROMPTS, SHORT]:
            ids = tok.encode(p)
            out[p] = (ids, hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1))
    return out


def check_against_hf(prompt_ids: list[int], plp: list, ref: torch.Tensor, k: int) -> None:
    """``plp`` is aligned with the prompt: None first, then the prompt token plus the k best."""
    assert len(plp) == len(prompt_ids) and plp[0] is None
    for j in range(1, len(prompt_ids)):
        entry, row, tok = plp[j], ref[j - 1], prompt_ids[j]
        assert tok in entry, f"position {j}"
        for t, lp in entry.items():
            assert abs(lp.logprob - float(row[t])) < TOL, f"position {j}, token {t}"
        v = float(row[tok])
        assert int((row > v + TOL).sum()) + 1 <= entry[tok].rank <= int((row >= v - TOL).sum())
        best = sorted((lp.logprob for t, lp in entry.items() if t != tok or lp.rank <= k), reverse=True)
        assert best == pytest.approx(row.topk(k).values.tolist(), abs=TOL)  # near-ties may swap ids
        assert len(entry) in (k, k + 1) if k else len(entry) == 1


class RowCounter:
    """Counts the prompt rows the executor is asked to score (wraps ``execute``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, engine: Any) -> None:
        self.rows: dict[str, list[int]] = {}
        real = engine.executor.execute

        def counting(plan: Any) -> Any:
            for s in plan.seqs:
                spec = s.prompt_logprobs
                if spec is not None:
                    rows = range(spec.first, spec.first + len(spec.targets))
                    self.rows.setdefault(s.req_id, []).extend(rows)
            return real(plan)

        monkeypatch.setattr(engine.executor, "execute", counting)


# ---- the engine ---------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [512, 7, 1])
def test_prompt_logprobs_equal_transformers(engine, llm, hf_logprobs, monkeypatch, chunk):
    """Every chunk boundary (chunk 1: every token is its own chunk); a batch-mate without prompt logprobs
    costs no LM-head rows; n > 1 scores the shared prompt once."""
    engine.reconfigure(scheduler="sarathi", chunk_size=chunk)
    counter = RowCounter(monkeypatch, engine)
    prompts = [PROMPTS[0] if chunk == 1 else PROMPTS[3], PROMPTS[2], SHORT, SHORT]
    params = [SamplingParams(temperature=0, max_tokens=3),  # no prompt logprobs
              SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=5, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=20),
              SamplingParams(temperature=0.8, n=2, seed=1, max_tokens=2, prompt_logprobs=0)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, sp, out in zip(prompts, params, outs):
        ids, ref = hf_logprobs[p]
        assert out.prompt_token_ids == ids
        if sp.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        check_against_hf(ids, out.prompt_logprobs, ref, sp.prompt_logprobs)
    # Each wanted row scored exactly once, by one sequence of the group; nothing for the others.
    wanted = {o.request_id: len(o.prompt_token_ids) - 1 for o, sp in zip(outs, params)
              if sp.prompt_logprobs is not None}
    got = {rid.split("#")[0]: rows for rid, rows in counter.rows.items()}
    assert len(got) == len(counter.rows) == len(wanted)  # n=2: only sequence 0 scores the prompt
    assert {rid: sorted(rows) for rid, rows in got.items()} == {rid: list(range(n))
                                                                for rid, n in wanted.items()}


@pytest.mark.parametrize("cfg", [dict(scheduler="sarathi", chunk_size=16, num_kv_blocks=8),
                                 dict(scheduler="vllm", num_kv_blocks=8)], ids=["sarathi", "vllm"])
def test_prompt_logprobs_under_preemption(engine, llm, hf_logprobs, monkeypatch, cfg):
    """A tiny KV cache forces recompute-preemption: the recomputed prompt adds no entries and asks for no
    row twice; the logprobs still equal transformers'."""
    engine.reconfigure(**cfg)
    counter = RowCounter(monkeypatch, engine)
    before = engine.scheduler.num_preemptions
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, prompt_logprobs=2)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert engine.scheduler.num_preemptions > before, "the small KV cache should have forced preemption"
    for p, out in zip(PROMPTS, outs):
        ids, ref = hf_logprobs[p]
        check_against_hf(ids, out.prompt_logprobs, ref, 2)
        rows = counter.rows[out.request_id]
        assert sorted(rows) == list(range(len(ids) - 1))  # no row computed twice


def test_preempted_mid_prompt_recomputes_without_duplicates(engine, llm, hf_logprobs, monkeypatch):
    """Preempted after some prompt chunks: the recomputed chunks ask for no rows again, the remaining
    ones still come, and the entries equal transformers' (forced through the scheduler's own preemption)."""
    from sarathi.scheduler.base import SchedulerOutput
    from tests.test_engine import run_all

    engine.reconfigure(scheduler="sarathi", chunk_size=16)
    counter = RowCounter(monkeypatch, engine)
    ids, ref = hf_logprobs[PROMPTS[3]]
    engine.add_request("long", {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=2,
                                                                         prompt_logprobs=1))
    for _ in range(3):
        engine.step()
    req = engine.scheduler.requests["long"]
    assert req.num_computed_tokens == 48 and req.num_in_flight == 0
    engine.scheduler._preempt(req, SchedulerOutput())
    assert req.num_computed_tokens == 0
    out = run_all(engine)["long"]
    check_against_hf(ids, out.prompt_logprobs, ref, 1)
    assert sorted(counter.rows["long"]) == list(range(len(ids) - 1))
    assert engine.scheduler.num_recomputed_tokens >= 48


def test_prompt_logprobs_with_token_ids_and_detokenize_false(engine, llm, hf_logprobs):
    ids, ref = hf_logprobs[SHORT]
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=1,
                                                                    detokenize=False), use_tqdm=False)[0]
    check_against_hf(ids, out.prompt_logprobs, ref, 1)
    assert all(lp.decoded_token is None for e in out.prompt_logprobs[1:] for lp in e.values())
    tok = llm.get_tokenizer()
    out = llm.generate([SHORT], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert [e[t].decoded_token for e, t in zip(out.prompt_logprobs[1:], ids[1:])] == [tok.decode([t], False)
                                                                                     for t in ids[1:]]


def test_best_of_keeps_the_n_best(engine, llm):
    """best_of=5, n=2 returns the two of the five candidates (the same seeded sequences n=5 gives) with the
    highest cumulative logprob, best first; num_generated_tokens counts all five."""
    base = dict(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    every = llm.generate([SHORT], SamplingParams(n=5, logprobs=0, **base), use_tqdm=False)[0]
    best = llm.generate([SHORT], SamplingParams(n=2, best_of=5, **base), use_tqdm=False)[0]
    ranked = sorted(every.outputs, key=lambda c: -c.cumulative_logprob)
    assert len({tuple(c.token_ids) for c in every.outputs}) > 1
    assert [c.index for c in best.outputs] == [0, 1]
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked[:2]]
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob
    for c, r in zip(best.outputs, ranked):
        assert math.isclose(c.cumulative_logprob, r.cumulative_logprob, abs_tol=1e-4)
        assert c.logprobs is None  # not asked for
    assert best.num_generated_tokens == every.num_generated_tokens == 30
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(prompt_logprobs=True), "prompt_logprobs"),
    (dict(prompt_logprobs=1.0), "prompt_logprobs"),
    (dict(n=3, best_of=2, temperature=1.0), "best_of"),
    (dict(best_of=0, temperature=1.0), "best_of"),
    (dict(best_of=65, temperature=1.0), "best_of"),
    (dict(best_of=2, temperature=0.0), "best_of"),
    (dict(best_of=True, temperature=1.0), "best_of"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and str(e.value).startswith(field)


def test_best_of_equal_to_n_and_greedy_is_fine():
    assert SamplingParams(n=2, best_of=2, temperature=0).num_seqs == 2
    assert not SamplingParams(n=2, best_of=2).keeps_best and SamplingParams(best_of=3).keeps_best


def test_executor_without_prompt_logprobs_is_refused(engine, monkeypatch):
    """An executor that cannot return prompt logprobs (the simulator) is refused naming the field."""
    from sarathi.executor.pipeline import PipelineExecutor
    from sarathi.executor.simulated import SimulatedExecutor

    assert PipelineExecutor.supports_prompt_logprobs  # its last rank does it (tests/test_pipeline.py)
    assert not getattr(SimulatedExecutor, "supports_prompt_logprobs", False)
    monkeypatch.setattr(engine.input, "prompt_logprobs", False)
    with pytest.raises(InvalidArgument) as e:
        engine.make_request("x", "Hi", SamplingParams(prompt_logprobs=0))
    assert e.value.field == "prompt_logprobs"
    engine.make_request("y", "Hi", SamplingParams(logprobs=1))  # other logprobs are unaffected


def test_missing_prompt_logprobs_fail_the_request_not_the_step(engine, llm, monkeypatch):
    """An executor that drops the prompt logprobs it was asked for fails that request (never silently)."""
    real = engine.executor.execute

    def dropping(plan: Any) -> Any:
        out = real(plan)
        out.prompt_logprobs.clear()
        return out

    monkeypatch.setattr(engine.executor, "execute", dropping)
    outs = llm.generate([SHORT, SHORT], [SamplingParams(max_tokens=2, prompt_logprobs=0),
                                         SamplingParams(temperature=0, max_tokens=2)], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "prompt logprobs" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "length" and outs[1].error is None


def test_prompt_logprobs_survive_failure_isolation(engine, llm, hf_logprobs, monkeypatch):
    """A batch-mate that fails the shared step: the step is re-run in halves and the innocent request's
    prompt logprobs come through the re-run (the engine merges them with its tokens)."""
    from tests.test_engine import run_all

    ids, ref = hf_logprobs[SHORT]
    real = engine.executor.execute

    def failing(plan: Any) -> Any:
        if any(s.req_id == "bad" for s in plan.seqs):
            raise RuntimeError("injected model failure")
        return real(plan)

    monkeypatch.setattr(engine.executor, "execute", failing)
    engine.add_request("ok", SHORT, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2))
    engine.add_request("bad", "Tell me a story", SamplingParams(max_tokens=3))
    final = run_all(engine)
    assert final["bad"].error and "injected" in final["bad"].error
    assert final["ok"].error is None and final["ok"].outputs[0].finish_reason == "length"
    check_against_hf(ids, final["ok"].prompt_logprobs, ref, 2)


# ---- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(llm):
    llm.engine.reconfigure(scheduler="sarathi", chunk_size=None, num_kv_blocks=None)
    with running_server(llm.engine) as srv:
        yield srv


def test_echo_with_logprobs(server, llm, hf_logprobs):
    """Completions ``echo`` + ``logprobs``: the prompt's tokens come first (the first with a null logprob),
    their logprobs equal transformers', then the completion's as without echo."""
    ids, ref = hf_logprobs[SHORT]
    client = server.openai()
    model = "SmolLM2-135M-Instruct"
    plain = client.completions.create(model=model, prompt=SHORT, max_tokens=4, temperature=0, logprobs=2)
    echo = client.completions.create(model=model, prompt=SHORT, max_tokens=4, temperature=0, logprobs=2,
                                     echo=True)
    c, lp, n = echo.choices[0], echo.choices[0].logprobs, len(ids)
    assert c.text == SHORT + plain.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens[:n]) == SHORT
    for j in range(1, n):
        assert abs(lp.token_logprobs[j] - float(ref[j - 1, ids[j]])) < TOL
        assert 2 <= len(lp.top_logprobs[j]) <= 3
    assert lp.tokens[n:] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[n:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset[:n] == [len("".join(lp.tokens[:j])) for j in range(n)]
    assert lp.text_offset[n] == len(SHORT) and lp.text_offset == sorted(lp.text_offset)
    assert echo.usage.completion_tokens == plain.usage.completion_tokens == 4
    assert echo.usage.prompt_tokens == n


def test_echo_with_max_tokens_0_and_streaming(server, llm, hf_logprobs):
    ids, ref = hf_logprobs[SHORT]
    body = {"prompt": SHORT, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    with server.client() as cl:
        r = cl.post("/v1/completions", json=body).json()
        c = r["choices"][0]
        assert c["text"] == SHORT and c["finish_reason"] == "length"
        assert len(c["logprobs"]["tokens"]) == len(ids) and c["logprobs"]["token_logprobs"][0] is None
        assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        bad = cl.post("/v1/completions", json={**body, "echo": False})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        full = cl.post("/v1/completions", json={**body, "max_tokens": 5}).json()["choices"][0]
        from tests.test_server import _sse

        with cl.stream("POST", "/v1/completions", json={**body, "max_tokens": 5, "stream": True}) as s:
            chunks = _sse(s.iter_lines())
    texts = [ch["choices"][0]["text"] for ch in chunks]
    assert texts[0] == SHORT and "".join(texts) == full["text"]
    first = chunks[0]["choices"][0]["logprobs"]
    assert first["tokens"] == full["logprobs"]["tokens"][:len(ids)]
    assert first["token_logprobs"][1:] == pytest.approx(full["logprobs"]["token_logprobs"][1:len(ids)],
                                                        abs=1e-5)
    streamed = [t for ch in chunks[1:] for t in ch["choices"][0]["logprobs"]["tokens"]]
    assert streamed == full["logprobs"]["tokens"][len(ids):]
    assert chunks[1]["choices"][0]["logprobs"]["text_offset"][0] == len(SHORT)


def test_prompt_logprobs_field_completions_and_chat(server, llm, hf_logprobs):
    """vLLM's extra field: per choice for completions, beside the choices for chat; token ids as keys."""
    ids, ref = hf_logprobs[SHORT]
    client = server.openai()
    r = client.completions.create(model="SmolLM2-135M-Instruct", prompt=SHORT, max_tokens=2, temperature=0,
                                  n=2, extra_body={"prompt_logprobs": 3, "seed": 1})
    for ch in r.choices:
        plp = ch.model_extra["prompt_logprobs"]
        assert len(plp) == len(ids) and plp[0] is None
        for j in range(1, len(ids)):
            entry = plp[j]
            assert abs(entry[str(ids[j])]["logprob"] - float(ref[j - 1, ids[j]])) < TOL
            assert len(entry) in (3, 4)
            assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())
    assert r.choices[0].logprobs is None
    chat = [{"role": "user", "content": "Hi"}]
    c = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=chat, max_tokens=2,
                                       extra_body={"prompt_logprobs": 0})
    plp = c.model_extra["prompt_logprobs"]
    prompt_ids = llm.get_tokenizer().encode(llm.get_tokenizer().apply_chat_template(chat), False)
    assert len(plp) == len(prompt_ids) == c.usage.prompt_tokens and plp[0] is None
    assert all(list(e) == [str(t)] for e, t in zip(plp[1:], prompt_ids[1:]))


def test_best_of_through_the_server(server):
    body = {"prompt": SHORT, "max_tokens": 5, "n": 2, "best_of": 4, "temperature": 1.0, "seed": 3,
            "ignore_eos": True, "logprobs": 0}
    with server.client() as cl:
        r = cl.post("/v1/completions", json=body).json()
    assert [ch["index"] for ch in r["choices"]] == [0, 1]
    sums = [sum(ch["logprobs"]["token_logprobs"]) for ch in r["choices"]]
    assert sums[0] >= sums[1]
    assert r["usage"]["completion_tokens"] == 4 * 5  # every candidate counts


@pytest.mark.parametrize("body, param", [
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": "2"}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 0}, "best_of"),
    ({"best_of": 10**6}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"best_of": 3, "temperature": 0}, "best_of"),
    ({"logprobs": 21, "echo": True}, "logprobs"),
])
def test_bad_requests_are_400_naming_the_field(server, body, param):
    with server.client() as cl:
        r = cl.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 1.0, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        if param == "prompt_logprobs":
            c = cl.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 2, **body})
            assert c.status_code == 400 and c.json()["error"]["param"] == param


def test_best_of_equal_to_n_may_stream(server):
    with server.client() as cl:
        r = cl.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 1.0,
                                             "best_of": 1, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
