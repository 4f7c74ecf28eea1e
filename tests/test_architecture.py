"""The engine's seams: plans are plain picklable data, several can be in flight, executors swap."""

from __future__ import annotations

import pickle
from concurrent.futures import Future
from typing import Any

import pytest

from sarathi import SamplingParams
from sarathi.executor import Executor
from sarathi.scheduler import ModelOutput, StepPlan
from tests.conftest import NUM_NEW

GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)


class HoldingExecutor(Executor):
    """Wraps the real executor, holding up to ``depth`` plans in flight: each runs when submitted (so
    K/V are written in order, as pipeline stages do) but its output only reaches the engine once
    ``depth`` plans are out, i.e. late."""

    name = "holding"

    def __init__(self, inner: Executor, depth: int, engine: Any) -> None:
        self.inner, self.max_in_flight, self.engine = inner, depth, engine
        self.max_seen = 0
        self.violations: list[str] = []

    def kv_bytes_per_block(self, block_size: int) -> int:
        return self.inner.kv_bytes_per_block(block_size)

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.inner.init_kv_cache(num_blocks, block_size)

    def execute(self, plan: StepPlan) -> ModelOutput:
        return self.inner.execute(plan)

    def submit(self, plan: StepPlan) -> Future[ModelOutput]:
        in_flight = [f.plan for f in self.engine._in_flight]
        self.max_seen = max(self.max_seen, len(in_flight) + 1)
        # A sequence whose token is due in a plan still in flight must not be scheduled again.
        due = {s.req_id for p in in_flight for s in p.seqs if s.sample is not None}
        if due & {s.req_id for s in plan.seqs}:
            self.violations.append(f"step {plan.step_id} reschedules {due & {s.req_id for s in plan.seqs}}")
        # Nor may two plans in flight write the same KV slot.
        slots = {(s.req_id, pos) for p in in_flight for s in p.seqs
                 for pos in range(s.start, s.start + s.num_tokens)}
        if slots & {(s.req_id, pos) for s in plan.seqs for pos in range(s.start, s.start + s.num_tokens)}:
            self.violations.append(f"step {plan.step_id} recomputes positions still in flight")
        return super().submit(plan)


@pytest.fixture
def holding(engine, monkeypatch):
    def install(depth: int) -> HoldingExecutor:
        ex = HoldingExecutor(engine.executor, depth, engine)
        monkeypatch.setattr(engine, "executor", ex)
        return ex

    return install


def test_plan_survives_pickle_and_executes_to_the_same_tokens(engine, llm, hf_reference):
    engine.reconfigure(chunk_size=32)
    ids, ref = hf_reference[3]  # the longest prompt: several chunks
    engine.add_request("p", {"prompt_token_ids": ids}, GREEDY)
    sched, ex = engine.scheduler, engine.executor
    req = sched.requests["p"]
    n_plans = 0
    while sched.has_unfinished():
        plan = sched.schedule()
        wire = pickle.loads(pickle.dumps(plan))
        assert wire == plan and wire is not plan
        out = ex.execute(wire)
        sched.update_from_output(plan, out)
        n_plans += 1
    assert req.output_token_ids == ref and n_plans >= len(ids) // 32 + NUM_NEW - 1
    engine.abort_request("p")  # drop its (finished) text state


@pytest.mark.parametrize("depth,config", [
    (2, dict(scheduler="sarathi", chunk_size=16)),
    (3, dict(scheduler="sarathi", chunk_size=16, num_kv_blocks=8)),  # preemption with plans in flight
    (3, dict(scheduler="orca")),
])
def test_plans_in_flight_give_the_same_greedy_tokens(engine, llm, hf_reference, holding, depth, config):
    engine.reconfigure(**config)
    ex = holding(depth)
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in hf_reference], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [ref for _, ref in hf_reference]
    assert ex.violations == []
    if config["scheduler"] == "sarathi":  # (orca batches all four at once: nothing to overlap)
        assert ex.max_seen == depth, "outputs never came back late"
    if "num_kv_blocks" in config:
        assert engine.scheduler.num_preemptions > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_abort_of_a_request_in_flight(engine, llm, hf_reference, holding):
    engine.reconfigure(chunk_size=16)
    ex = holding(2)
    (ids0, ref0), (ids3, _) = hf_reference[0], hf_reference[3]
    engine.add_request("keep", {"prompt_token_ids": ids0}, GREEDY)
    engine.add_request("drop", {"prompt_token_ids": ids3}, GREEDY)
    for _ in range(3):
        engine.step()
    drop = engine.scheduler.requests["drop"]
    assert drop.num_in_flight > 0 and drop.block_ids
    engine.abort_request("drop")
    assert drop.finished and drop.block_ids, "blocks of an in-flight request are freed when it returns"
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            final[out.request_id] = out
    assert set(final) == {"keep"} and final["keep"].outputs[0].token_ids == ref0
    assert not drop.block_ids and engine.kv.num_free_blocks == engine.kv.num_blocks
    assert "drop" not in engine.scheduler.requests and ex.violations == []
