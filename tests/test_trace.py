"""``--trace``: Chrome / Perfetto JSON of every step (local and simulated executors: one span per step;
pipeline: one track per stage, compute and communication apart), written when the engine shuts down,
bounded in memory; the pipeline's bubbles in ``EngineStats``."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

from sarathi import SamplingParams
from sarathi.trace import Tracer

PROMPTS = ["The capital of France is", "Write a short poem about the sea. The sea is calm and blue, and the"]
MAX_TOKENS = 6
PARAMS = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def load(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The trace's "X" events, and the whole document (which must be plain JSON)."""
    with open(path) as f:
        doc = json.load(f)
    return [e for e in doc["traceEvents"] if e["ph"] == "X"], doc


def track_names(doc: dict[str, Any]) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}


def check_tracks_do_not_overlap(spans: list[dict[str, Any]]) -> None:
    """Perfetto draws the slices of one track as a stack: complete events on a track must not overlap."""
    for tid in {e["tid"] for e in spans}:
        mine = sorted((e for e in spans if e["tid"] == tid), key=lambda e: e["ts"])
        for a, b in zip(mine, mine[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-3, (a, b)


def prompt_lengths(llm: Any) -> int:
    return sum(len(llm.get_tokenizer().encode(p)) for p in PROMPTS)


def test_local_trace_one_span_per_step_written_when_the_llm_is_collected(tmp_path) -> None:
    from sarathi import LLM

    path = tmp_path / "local.json"
    llm = LLM(dtype="float32", kv_cache_memory="32MiB", chunk_size=16, threads=1, trace=str(path))
    engine = llm.engine
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)
    n_prompt = prompt_lengths(llm)
    assert not path.exists()
    del llm  # the LLM object garbage collected: the trace is written (the engine lives on here)
    gc.collect()
    spans, doc = load(path)
    steps = list(engine.stats.steps)
    assert len(spans) == len(steps) == engine.stats.num_steps > 2
    assert [e["args"]["step"] for e in spans] == [s.step for s in steps]
    assert sum(e["args"]["prompt_tokens"] for e in spans) == n_prompt  # the chunks of every prompt
    assert sum(e["args"]["decode_tokens"] for e in spans) == len(PROMPTS) * (MAX_TOKENS - 1)
    assert [(e["args"]["prompt_tokens"], e["args"]["decode_tokens"]) for e in spans] == [
        (s.num_prompt_tokens, s.num_decode_tokens) for s in steps]
    assert all(e["args"]["seqs"] == s.num_requests for e, s in zip(spans, steps))
    assert {e["tid"] for e in spans} == {0} and track_names(doc) == {0: "steps"}
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in spans)
    check_tracks_do_not_overlap(spans)
    assert {e["name"].split()[0] for e in spans} >= {"prefill", "decode"}
    assert engine.stats.bubbles is None and engine.stats.bubble_fractions is None  # no pipeline
    assert doc["otherData"]["dropped_spans"] == 0
    engine.shutdown()  # writes it again, same steps
    assert len(load(path)[0]) == len(steps)


def test_simulated_pipeline_trace_lanes_never_overlap(tmp_path) -> None:
    """The simulated executor holds two plans in flight at PP=2: each gets its own lane (track)."""
    from sarathi import LLM

    path = tmp_path / "sim.json"
    with LLM(executor="simulated", pipeline_parallel_size=2, chunk_size=16, trace=str(path),
             enable_prefix_caching=False) as llm:  # (repeated prompts: every token is computed)
        llm.generate(PROMPTS * 3, PARAMS, use_tqdm=False)
        n_steps, n_prompt = llm.engine.stats.num_steps, 3 * prompt_lengths(llm)
    spans, doc = load(path)
    assert len(spans) == n_steps and {e["tid"] for e in spans} == {0, 1}
    assert sum(e["args"]["prompt_tokens"] for e in spans) == n_prompt
    assert sum(e["args"]["decode_tokens"] for e in spans) == 3 * len(PROMPTS) * (MAX_TOKENS - 1)
    check_tracks_do_not_overlap(spans)


def test_tracer_keeps_only_the_newest_spans(tmp_path) -> None:
    """A long-running server's trace is bounded: the newest ``max_spans`` are kept, the drop is noted."""
    clock = iter(range(100)).__next__
    tracer = Tracer(tmp_path / "t.json", clock=lambda: float(clock()), max_spans=3)
    tracer.add((0, "compute", float(i), i + 0.5, i, 4, 1, 2) for i in range(1, 6))
    tracer.instant("reconfigure", {"scheduler": "vllm"})
    spans, doc = load(tracer.write())
    assert [e["args"]["step"] for e in spans] == [3, 4, 5] and len(tracer) == 3
    assert doc["otherData"]["dropped_spans"] == 2 and "dropped" in doc["otherData"]["note"]
    assert spans[0] == {"ph": "X", "pid": 0, "tid": 0, "cat": "compute", "name": "mixed 3", "ts": 3e6,
                        "dur": 0.5e6, "args": {"step": 3, "prompt_tokens": 4, "decode_tokens": 1, "seqs": 2}}
    names = {e["name"] for e in doc["traceEvents"] if e["ph"] == "i"}
    assert names == {"reconfigure", "2 older spans dropped"}


@pytest.fixture(scope="module")
def pp_trace(tmp_path_factory) -> tuple[Path, dict[str, Any], int, tuple[int, int]]:
    """A PP=2 engine (one spawned rank) traced through a reconfiguration, then closed; returns the
    number of steps before and after the reconfiguration."""
    from sarathi import LLM

    path = tmp_path_factory.mktemp("pp") / "pp.json"
    llm = LLM(dtype="float32", kv_cache_memory="32MiB", pipeline_parallel_size=2, threads=1, chunk_size=16,
              pipeline_timeout=30, trace=str(path))
    try:
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        stats = llm.engine.stats
        bubbles = stats.bubbles
        assert bubbles is not None and stats.bubble_seconds == bubbles["bubble_s"]
        assert stats.bubble_fractions == [s["bubble_fraction"] for s in bubbles["stages"]]
        first = stats.num_steps
        llm.engine.reconfigure(scheduler="vllm")
        llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)
        steps = (first, stats.num_steps - first)
        n_prompt = prompt_lengths(llm) + len(llm.get_tokenizer().encode(PROMPTS[0]))
    finally:
        llm.close()
    assert llm.engine.executor.failure is not None  # closed: nothing runs any more
    return path, bubbles, n_prompt, steps


def test_pipeline_trace_has_a_track_per_stage_with_compute_and_comm(pp_trace) -> None:
    path, bubbles, n_prompt, steps = pp_trace
    spans, doc = load(path)
    assert track_names(doc) == {0: "stage 0 (layers 0-14)", 1: "stage 1 (layers 15-29)"}
    ids = [[e["args"]["step"] for e in spans if e["tid"] == stage and e["cat"] == "compute"]
           for stage in (0, 1)]
    assert ids[0] == ids[1] and len(ids[0]) == sum(steps)  # every micro-batch on both stages, in order
    # the scheduler's plan ids: increasing, restarting with the new scheduler after the reconfiguration
    assert ids[0][:steps[0]] == sorted(set(ids[0][:steps[0]])) and ids[0][steps[0]] == 1
    assert ids[0][steps[0]:] == sorted(set(ids[0][steps[0]:]))
    # stage 0 issues the sends (it receives nothing); stage 1 receives (the output's send is not timed)
    for stage, kind in ((0, "send"), (1, "recv")):
        assert {e["name"].split()[0] for e in spans if e["tid"] == stage and e["cat"] == "comm"} == {kind}
    stage0 = [e for e in spans if e["tid"] == 0 and e["cat"] == "compute"]
    assert sum(e["args"]["prompt_tokens"] for e in stage0) == n_prompt
    assert sum(e["args"]["decode_tokens"] for e in stage0) == (len(PROMPTS) + 1) * (MAX_TOKENS - 1)
    check_tracks_do_not_overlap(spans)
    marks = [e for e in doc["traceEvents"] if e["ph"] == "i"]
    assert [(m["name"], m["args"]) for m in marks] == [("reconfigure", {"scheduler": "vllm"})]
    assert [s["stage"] for s in bubbles["stages"]] == [0, 1] and bubbles["pending_s"] > 0
