"""LLMEngine behaviour: streaming outputs, abort, failures, reconfigure."""

from __future__ import annotations

import pytest

from sarathi import SamplingParams


def run_all(engine) -> dict[str, object]:
    final = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def test_step_outputs_are_cumulative_and_abort_frees_blocks(engine):
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("a", "The capital of France is", p)
    engine.add_request("b", "Once upon a time", p)
    seen: list[list[int]] = []
    for _ in range(4):
        for out in engine.step():
            if out.request_id == "a":
                seen.append(list(out.outputs[0].token_ids))
    assert seen and all(len(x) <= len(y) and y[: len(x)] == x for x, y in zip(seen, seen[1:]))
    used = engine.kv.num_blocks - engine.kv.num_free_blocks
    assert used > 0
    engine.abort_request("b")
    engine.abort_request("does-not-exist")  # unknown ids are ignored
    final = run_all(engine)
    assert set(final) == {"a"} and len(final["a"].outputs[0].token_ids) == 12
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_duplicate_request_id_rejected(engine):
    engine.add_request("dup", "Hello", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("dup", "Hello", SamplingParams(max_tokens=2))
    run_all(engine)


def test_engine_failure_finishes_the_request_with_an_error_and_recovers(engine, monkeypatch):
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("x", "Hello there", p)
    real = engine.executor.execute

    def boom(batch):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine.executor, "execute", boom)
    (out,) = engine.step()
    assert out.request_id == "x" and out.finished and "simulated kernel failure" in out.error
    assert out.outputs[0].finish_reason == "error"
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    monkeypatch.setattr(engine.executor, "execute", real)
    engine.add_request("y", "Hello there", p)
    assert len(run_all(engine)["y"].outputs[0].token_ids) == 4


def test_reconfigure_refuses_while_busy_and_rejects_unknown_fields(engine):
    with pytest.raises(ValueError, match="reconfigure"):
        engine.reconfigure(model="other")
    engine.add_request("busy", "Hello", SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="running"):
        engine.reconfigure(scheduler="vllm")
    run_all(engine)
    engine.reconfigure(scheduler="orca", max_num_seqs=2)
    assert engine.scheduler.name == "orca" and engine.scheduler.config.max_num_seqs == 2


def test_metrics_timestamps_are_ordered(engine):
    engine.add_request("m", "Hello", SamplingParams(max_tokens=3, ignore_eos=True))
    m = run_all(engine)["m"].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time
    assert m.finished_time == m.last_token_time


def test_detokenize_false_returns_ids_only(engine):
    """vLLM's ``detokenize=False``: the same tokens, no text; stop strings (matched on text) refused."""
    p = dict(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("text", "The capital of France is", SamplingParams(**p))
    engine.add_request("ids", "The capital of France is", SamplingParams(**p, detokenize=False, logprobs=1))
    final = run_all(engine)
    text, ids = final["text"].outputs[0], final["ids"].outputs[0]
    assert ids.token_ids == text.token_ids and text.text and ids.text == ""
    assert len(ids.logprobs) == 6 and all(lp.decoded_token is None for e in ids.logprobs for lp in e.values())
    with pytest.raises(ValueError) as e:
        SamplingParams(stop=["."], detokenize=False)
    assert e.value.field == "detokenize"


def test_a_dropped_llm_frees_its_model_without_the_cyclic_gc():
    """Weights and KV cache go when the last reference does: large tensors never trigger the cyclic GC,
    so an engine kept alive by a reference cycle made a second LLM in one process run out of memory."""
    import gc
    import weakref

    from sarathi import LLM

    gc.disable()
    try:
        llm = LLM(kv_cache_memory="16MiB")
        llm.generate(["Hi"], SamplingParams(max_tokens=2), use_tqdm=False)
        ex = llm.engine.executor
        model, cache = weakref.ref(ex.model), weakref.ref(ex.kv_caches[0][0])
        del ex
        del llm
        assert model() is None and cache() is None
    finally:
        gc.enable()
