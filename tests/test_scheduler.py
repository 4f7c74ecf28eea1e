"""Scheduler and KV-cache invariants, driven without a model (the policies are pure Python)."""

from __future__ import annotations

import random

import pytest

from sarathi.kv_cache import BlockManager
from sarathi.request import Request, RequestStatus
from sarathi.sampling_params import SamplingParams
from sarathi.scheduler import (
    ModelOutput,
    SampledToken,
    ScheduledRequest,
    SchedulerConfig,
    SchedulerOutput,
    StepPlan,
    make_scheduler,
)


def make_req(i: int, prompt_len: int, max_tokens: int) -> Request:
    return Request(str(i), list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens, group_id=str(i))


class Driver:
    """Drives a scheduler through its public API like the engine does: ``schedule()`` a plan, then
    ``update_from_output`` with a made-up token (7) for every sequence that has one due. With
    ``depth > 1`` that many plans are in flight before the oldest comes back (pipeline stages)."""

    def __init__(self, policy: str, budget: int, num_blocks: int, block_size: int = 4,
                 max_num_seqs: int = 8, tile: int | None = None, depth: int = 1) -> None:
        self.kv = BlockManager(num_blocks, block_size)
        self.sched = make_scheduler(SchedulerConfig(policy, max_num_seqs, budget, tile), self.kv)
        self.finished: list[Request] = []
        self.depth = depth
        self.in_flight: list[tuple[StepPlan, SchedulerOutput]] = []

    def check_ownership(self) -> None:
        live = [*self.sched.running, *(r for r in self.sched.requests.values() if r.finished)]
        owned = [b for r in live for b in r.block_ids]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert len(owned) + self.kv.num_free_blocks == self.kv.num_blocks, "blocks leaked"
        for r in self.sched.waiting:
            assert not r.block_ids

    def schedule(self) -> SchedulerOutput | None:
        """One plan, checked, as the policy's view (ScheduledRequest entries); None if empty."""
        before = {id(r): r.is_decode for r in self.sched.running}
        plan = self.sched.schedule()
        if plan.is_empty:
            return None
        ids = [s.req_id for s in plan.seqs]
        assert len(ids) == len(set(ids)), "a request was scheduled twice in one step"
        waiting_for_token = {s.req_id for p, _ in self.in_flight for s in p.seqs if s.sample is not None}
        assert not waiting_for_token & set(ids), "a request waiting for its token was scheduled again"
        view = SchedulerOutput(preempted=[r for r in self.sched.requests.values()
                                          if r.request_id in plan.preempted])
        for s in plan.seqs:
            r = self.sched.requests[s.req_id]
            assert s.num_tokens >= 1 and s.start + s.num_tokens <= r.num_tokens
            assert s.token_ids == r.token_ids[s.start:s.start + s.num_tokens]
            assert len(s.block_table) * self.kv.block_size >= s.start + s.num_tokens
            assert (s.sample is not None) == (s.start + s.num_tokens == r.num_tokens)
            assert r.status == RequestStatus.RUNNING
            view.scheduled.append(ScheduledRequest(r, s.num_tokens, s.is_decode))
        self.check_ownership()
        view.decodes_before = before  # type: ignore[attr-defined]
        self.in_flight.append((plan, view))
        return view

    def collect(self) -> None:
        plan, _ = self.in_flight.pop(0)
        out = ModelOutput(plan.step_id, {s.req_id: SampledToken(7) for s in plan.seqs if s.sample})
        for u in self.sched.update_from_output(plan, out):
            if u.request.finished and u.request not in self.finished:
                self.finished.append(u.request)
        self.check_ownership()

    def step(self) -> SchedulerOutput:
        """Schedule one plan and collect it at once (depth 1)."""
        view = self.schedule()
        assert view is not None, "nothing was scheduled while requests were unfinished"
        self.collect()
        return view

    def run(self, reqs: list[Request], max_steps: int = 10_000) -> list[SchedulerOutput]:
        for r in reqs:
            self.sched.add_request(r)
        outs: list[SchedulerOutput] = []
        while self.sched.has_unfinished() or self.in_flight:
            while len(self.in_flight) < self.depth:
                view = self.schedule()
                if view is None:
                    break
                outs.append(view)
            assert self.in_flight, "nothing was scheduled while requests were unfinished"
            self.collect()
            assert len(outs) < max_steps, "requests starved"
        assert len(self.finished) == len(reqs)
        assert all(len(r.output_token_ids) == r.max_tokens for r in reqs)
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert not self.sched.requests
        return outs


def random_workload(seed: int, n: int = 12) -> list[Request]:
    rng = random.Random(seed)
    return [make_req(i, rng.randint(1, 40), rng.randint(1, 12)) for i in range(n)]


@pytest.mark.parametrize("policy", ["sarathi", "vllm", "orca", "request_level"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_blocks", [16, 200])
def test_every_request_finishes_and_all_blocks_return(policy, seed, num_blocks):
    d = Driver(policy, budget=24 if policy == "sarathi" else 64, num_blocks=num_blocks)
    d.run(random_workload(seed))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget,tile", [(7, None), (24, None), (64, 16)])
def test_sarathi_budget_and_decodes_first(seed, budget, tile):
    d = Driver("sarathi", budget=budget, num_blocks=400, tile=tile)
    outs = d.run(random_workload(seed))
    effective = budget - budget % tile if tile else budget
    for out in outs:
        assert out.num_tokens <= effective
        kinds = [s.is_decode for s in out.scheduled]
        # decodes come first, prompt chunks after
        assert kinds == sorted(kinds, reverse=True)
        # every request that was a decode before the step got scheduled (budget permitting)
        n_dec_before = sum(out.decodes_before.values())
        assert out.num_decode_tokens == min(n_dec_before, effective) or out.preempted
        # prompt chunks never crowd out a decode: if any prompt tokens ran, all decodes ran
        if out.num_prompt_tokens:
            assert out.num_decode_tokens == n_dec_before


def test_sarathi_chunks_prompt_and_piggybacks():
    d = Driver("sarathi", budget=16, num_blocks=400)
    outs = d.run([make_req(0, 10, 20), make_req(1, 100, 3)])
    mixed = [o for o in outs if o.num_prompt_tokens and o.num_decode_tokens]
    assert mixed, "decodes of request 0 should ride along request 1's prompt chunks"
    assert max(o.num_prompt_tokens for o in outs) <= 16


def test_tile_alignment_fills_tiles():
    d = Driver("sarathi", budget=70, num_blocks=400, tile=32)
    outs = d.run([make_req(0, 5, 30), make_req(1, 5, 30), make_req(2, 300, 2)])
    full = [o for o in outs if o.num_prompt_tokens and o.num_decode_tokens]
    # the 70-token budget is rounded down to 2 tiles; full mixed steps fill them exactly
    assert max(o.num_tokens for o in outs) == 64
    assert sum(o.num_tokens == 64 for o in full) >= 3


def test_vllm_steps_are_prefill_only_or_decode_only():
    d = Driver("vllm", budget=64, num_blocks=400)
    outs = d.run(random_workload(3))
    for o in outs:
        assert not (o.num_prompt_tokens and o.num_decode_tokens)


def test_orca_and_baselines_never_split_prompts():
    for policy in ("vllm", "orca", "request_level"):
        d = Driver(policy, budget=64, num_blocks=400)
        reqs = random_workload(5)
        outs = d.run(reqs)
        for o in outs:
            for s in o.scheduled:
                if not s.is_decode:
                    assert s.num_new_tokens == s.request.num_prompt_tokens or s.request.num_preemptions


def test_request_level_waits_for_whole_batch():
    d = Driver("request_level", budget=1000, num_blocks=400, max_num_seqs=3)
    reqs = [make_req(i, 5, 2 + 3 * i) for i in range(6)]
    for r in reqs:
        d.sched.add_request(r)
    batches: list[set[str]] = []
    while d.sched.has_unfinished():
        running_before = {r.request_id for r in d.sched.running}
        out = d.step()
        admitted = {s.request.request_id for s in out.scheduled if not s.is_decode}
        if admitted:
            assert not running_before, "a new batch started before the previous one finished"
            batches.append(admitted)
    assert batches == [{"0", "1", "2"}, {"3", "4", "5"}]


def test_long_prompt_runs_alone_instead_of_starving():
    d = Driver("vllm", budget=16, num_blocks=400)
    d.run([make_req(0, 50, 3), make_req(1, 4, 3)])


def test_preemption_requeues_newest_at_front_and_recomputes():
    # Both prompts fit at admission (2 blocks each, beside the reserve); their decodes then outgrow the
    # cache (2 x 6 blocks > 8), so the most recently admitted one is preempted and recomputed.
    d = Driver("sarathi", budget=64, num_blocks=8, block_size=4)
    a, b = make_req(0, 4, 20), make_req(1, 4, 20)
    d.run([a, b])
    assert d.sched.num_preemptions > 0
    assert b.num_preemptions > 0 and a.num_preemptions == 0  # the most recently admitted goes first
    assert d.sched.num_recomputed_tokens >= 8  # at least b's prompt was computed twice
    assert len(a.output_token_ids) == len(b.output_token_ids) == 20


@pytest.mark.parametrize("policy", ["sarathi", "vllm", "orca"])
def test_admission_waits_for_room_instead_of_thrashing(policy):
    # Admitting b as soon as any block is free would let a's decodes preempt it over and over; the
    # admission reserve makes b wait until a's growth leaves room for all of b's prompt.
    d = Driver(policy, budget=64, num_blocks=6, block_size=4)
    a, b = make_req(0, 8, 10), make_req(1, 8, 10)
    d.run([a, b])
    assert d.sched.num_preemptions == 0 and d.sched.num_recomputed_tokens == 0
    assert len(a.output_token_ids) == len(b.output_token_ids) == 10


def test_admission_never_starves_a_request_that_fits_an_empty_cache():
    # Each request alone fills the cache: with nothing running the reserve does not apply.
    d = Driver("sarathi", budget=16, num_blocks=5, block_size=4)
    reqs = [make_req(i, 12, 8) for i in range(3)]
    d.run(reqs)
    assert all(len(r.output_token_ids) == 8 for r in reqs)


def test_abort_frees_blocks_in_any_state():
    kv = BlockManager(50, 4)
    sched = make_scheduler(SchedulerConfig("sarathi", 8, 10, None), kv)
    reqs = [make_req(i, 15, 5) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    plan = sched.schedule()  # in flight: some running with partial prompts, some still waiting
    in_flight = [sched.requests[s.req_id] for s in plan.seqs]
    assert in_flight and len(in_flight) < len(reqs)
    for r in reqs:
        sched.finish_request(r, RequestStatus.FINISHED_ABORTED)
        sched.finish_request(r, RequestStatus.FINISHED_ABORTED)  # idempotent, no double free
    assert not sched.has_unfinished()
    # The in-flight plan may still be writing their K/V: their blocks come back with its output.
    assert kv.num_free_blocks == kv.num_blocks - sum(len(r.block_ids) for r in in_flight) < kv.num_blocks
    assert sched.update_from_output(plan, ModelOutput(plan.step_id)) == []
    assert kv.num_free_blocks == kv.num_blocks and not sched.requests


@pytest.mark.parametrize("policy", ["sarathi", "vllm", "orca", "request_level"])
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_blocks", [16, 200])
def test_several_plans_in_flight(policy, depth, seed, num_blocks):
    """With 2-3 plans in flight (outputs come back late), no request waiting for its token is scheduled
    again, no block is owned twice (the Driver checks both every step), and everything finishes."""
    d = Driver(policy, budget=24 if policy == "sarathi" else 64, num_blocks=num_blocks, depth=depth)
    d.run(random_workload(seed))


def test_next_prompt_chunk_is_scheduled_behind_one_in_flight():
    d = Driver("sarathi", budget=8, num_blocks=100, depth=2)
    r = make_req(0, 20, 2)
    d.sched.add_request(r)
    first, second = d.schedule(), d.schedule()
    assert first is not None and second is not None
    assert [s.num_new_tokens for s in first.scheduled] == [8] == [s.num_new_tokens for s in second.scheduled]
    assert r.num_computed_tokens == 16 and r.num_in_flight == 2
    d.collect()
    d.collect()
    while d.sched.has_unfinished():
        d.step()
    assert r.output_token_ids == [7, 7] and d.kv.num_free_blocks == d.kv.num_blocks


def test_preemption_never_picks_a_request_in_flight():
    # a's chunk is in flight when b's decodes need blocks: b cannot evict it, so b waits instead.
    d = Driver("sarathi", budget=64, num_blocks=8, block_size=4, depth=2)
    a, b = make_req(0, 4, 20), make_req(1, 4, 20)
    d.run([a, b])
    for plan, _ in d.in_flight:
        raise AssertionError(f"plan {plan.step_id} left in flight")
    assert d.sched.num_preemptions >= 1


def test_double_free_is_detected():
    kv = BlockManager(4, 4)
    r = make_req(0, 5, 1)
    kv.allocate(r, 5)
    blocks = list(r.block_ids)
    kv.free(r)
    r.block_ids = blocks
    with pytest.raises(RuntimeError, match="freed twice"):
        kv.free(r)


def test_unknown_policy_is_a_value_error():
    with pytest.raises(ValueError, match="scheduler"):
        make_scheduler(SchedulerConfig("fifo", 8, 10, None), BlockManager(4, 4))


class _Seq:
    """The two fields of a Request the block manager reads and writes."""

    def __init__(self, i: int) -> None:
        self.request_id, self.block_ids, self.num_computed_tokens = str(i), [], 0


def _free_runs(kv: BlockManager) -> list[tuple[int, int]]:
    runs, start = [], None
    for b in range(kv.num_blocks + 1):
        free = b < kv.num_blocks and kv._is_free[b]
        if free and start is None:
            start = b
        elif not free and start is not None:
            runs.append((start, b - start))
            start = None
    return runs


@pytest.mark.parametrize("seed", range(20))
def test_block_manager_free_runs_track_the_bitmap_and_layout_rules(seed):
    """Random allocations and frees: the run index always equals the bitmap's maximal free runs, a
    growing request takes the block after its last one when it is free, and a new run starts in the
    middle of the largest free run (its start at block 0)."""
    rng = random.Random(seed)
    kv = BlockManager(rng.randint(1, 200), rng.choice([1, 4, 16]))
    live: dict[int, _Seq] = {}
    for _ in range(300):
        if rng.random() < 0.6:
            i = rng.randrange(30)
            req = live.setdefault(i, _Seq(i))
            n = rng.randint(1, 3 * kv.block_size)
            if not kv.can_allocate(req, n):
                continue
            runs = _free_runs(kv)
            before = list(req.block_ids)
            kv.allocate(req, n)
            req.num_computed_tokens += n
            new = req.block_ids[len(before):]
            if new:
                starts = {s: length for s, length in runs}
                if before and before[-1] + 1 in starts:
                    assert new[0] == before[-1] + 1
                else:
                    s, length = max(runs, key=lambda r: (r[1], -r[0]))
                    assert new[0] == (0 if s == 0 else s + length // 2)
        elif live:
            kv.free(live.pop(rng.choice(list(live))))
        assert sorted(kv._runs.items()) == _free_runs(kv)
        owned = [b for r in live.values() for b in r.block_ids]
        assert len(owned) == len(set(owned)) and len(owned) + kv.num_free_blocks == kv.num_blocks
