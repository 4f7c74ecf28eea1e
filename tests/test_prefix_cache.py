"""Prefix caching in the block manager: invariants under random admit / compute / register / free
sequences (hypothesis), and that a shared block always holds exactly the prefix it is shared for."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sarathi.kv_cache import BlockManager
from tests.test_scheduler import _free_runs


class _Seq:
    """The Request fields the block manager reads and writes."""

    def __init__(self, i: int, tokens: list[int]) -> None:
        self.request_id, self.token_ids = str(i), tokens
        self.block_ids: list[int] = []
        self.num_computed_tokens = self.num_cached_tokens = self.num_registered_blocks = 0


def check(kv: BlockManager, live: dict[int, _Seq], content: dict[int, tuple[int, ...]]) -> None:
    held: dict[int, int] = {}
    for r in live.values():
        for b in r.block_ids:
            held[b] = held.get(b, 0) + 1
    for b in range(kv.num_blocks):
        free, idle, ref = bool(kv._is_free[b]), b in kv._idle, kv._ref[b]
        assert ref == held.get(b, 0), f"block {b}: count {ref}, held by {held.get(b, 0)}"
        assert (free, idle, ref > 0).count(True) == 1, f"block {b}: free {free} idle {idle} ref {ref}"
        assert not idle or b in kv._key_of, "an idle block must be cached"
    assert len(kv._cached) == len(kv._key_of) and all(kv._cached[k] == b for b, k in kv._key_of.items())
    assert kv.num_free_blocks == sum(kv._is_free) + len(kv._idle)
    assert sorted(kv._runs.items()) == _free_runs(kv)
    for b, key in kv._key_of.items():  # a cached block holds the prefix its key chain names
        assert content[b][-kv.block_size:] == key[2]


ops = st.lists(st.tuples(st.sampled_from(["admit", "compute", "register", "free"]),
                         st.integers(0, 7), st.integers(1, 40), st.integers(0, 3)), max_size=120)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(num_blocks=st.integers(4, 40), block_size=st.sampled_from([1, 2, 4]), ops=ops)
def test_prefix_cache_invariants(num_blocks, block_size, ops):
    kv = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    live: dict[int, _Seq] = {}
    content: dict[int, tuple[int, ...]] = {}  # block -> the whole prefix its K/V was computed for
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8] * 4, [1, 2, 3, 4, 9, 9, 9, 9] * 4, [5] * 32]
    for op, i, n, variant in ops:
        r = live.get(i)
        if op == "admit" and r is None:
            toks = prefixes[variant % 3][:n] + [100 + variant] * (n // 3)
            r = _Seq(i, toks)
            hit = kv.match(r)
            # Taking idle cached blocks uses free capacity: admit only if the rest fits too.
            rest = -(-len(toks) // block_size) - len(hit)
            if rest + kv.idle_blocks_in(hit) > kv.num_free_blocks:
                continue
            kv.share(r, hit)
            for j, b in enumerate(hit):
                assert content[b] == tuple(toks[:(j + 1) * block_size]), "shared a block of another prefix"
            assert r.num_computed_tokens < len(toks), "at least one token is left to compute"
            live[i] = r
        elif op == "compute" and r is not None and r.num_computed_tokens < len(r.token_ids):
            k = min(n, len(r.token_ids) - r.num_computed_tokens)
            if not kv.can_allocate(r, k):
                continue
            kv.allocate(r, k)
            r.num_computed_tokens += k
            for j in range(r.num_computed_tokens // block_size):
                b = r.block_ids[j]
                if b not in kv._key_of:  # (a shared block's content is already right)
                    content[b] = tuple(r.token_ids[:(j + 1) * block_size])
        elif op == "register" and r is not None:
            kv.register(r)
        elif op == "free" and r is not None:
            kv.free(live.pop(i))
        check(kv, live, content)
    for r in list(live.values()):
        kv.free(r)
    live.clear()
    check(kv, live, content)
    kv.reset_prefix_cache()
    assert kv.num_free_blocks == kv.num_blocks == sum(kv._is_free) and not kv._cached


def test_shared_prefix_hits_and_lru_eviction():
    kv = BlockManager(6, 4, enable_prefix_caching=True)
    a = _Seq(0, list(range(10)))  # blocks [0..3] [4..7] + 2 tokens
    kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.register(a)
    b = _Seq(1, list(range(8)) + [99, 98, 97])
    hit = kv.match(b)
    assert hit == a.block_ids[:2]
    kv.share(b, hit)
    assert b.num_computed_tokens == b.num_cached_tokens == 8 and kv._ref[hit[0]] == 2
    exact = _Seq(2, list(range(8)))  # the whole prompt cached: the last block is recomputed
    assert kv.match(exact) == a.block_ids[:1]
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 6 and len(kv._idle) == 2
    big = _Seq(3, [7] * 24)  # needs every block: both cached ones are evicted, the tail first
    kv.allocate(big, 24)
    assert not kv._cached and kv.num_free_blocks == 0
    kv.free(big)
    assert kv.match(b) == []


SYSTEM = ("You are a helpful assistant for a small bakery. You answer questions about bread, opening hours "
          "and orders politely and briefly. The bakery opens at seven and closes at six, except on Sundays. ")
QUESTIONS = ["When do you open?", "Do you sell rye bread?", "Can I order a cake for Friday?",
             "What is sourdough?", "Are you open on Sunday?"]


def _run(engine, prompts, n=1, max_tokens=8):
    from sarathi import SamplingParams

    sp = SamplingParams(temperature=0 if n == 1 else 0.8, seed=3, n=n, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, sp)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    return [[c.token_ids for c in outs[f"r{i}"].outputs] for i in range(len(prompts))], outs



@pytest.mark.parametrize("scheduler,chunk,blocks", [("sarathi", 24, None), ("sarathi", 16, 14),
                                                    ("vllm", None, None), ("orca", None, 14),
                                                    ("request_level", None, None)])
def test_greedy_tokens_identical_with_prefix_caching(engine, scheduler, chunk, blocks):
    """Same greedy tokens with caching on and off (two passes, so the second hits the first's blocks),
    for every policy, chunk sizes that cut blocks, and a KV cache small enough to preempt."""
    prompts = [SYSTEM + q for q in QUESTIONS]
    engine.reconfigure(scheduler=scheduler, chunk_size=chunk, num_kv_blocks=blocks, block_size=4,
                       enable_prefix_caching=False)
    ref, _ = _run(engine, prompts)
    engine.reconfigure(enable_prefix_caching=True)
    first, _ = _run(engine, prompts)
    again, outs = _run(engine, prompts)
    assert first == ref and again == ref
    kv = engine.kv
    assert kv.num_hit_tokens > 0 and kv.num_hit_tokens <= kv.num_query_tokens
    assert any(o.num_cached_tokens > 0 for o in outs.values())


def test_prefix_caching_with_n_and_prompt_logprobs(engine):
    """n > 1 seeded samples are the same with caching; prompt_logprobs requests compute every row."""
    from sarathi import SamplingParams

    prompts = [SYSTEM + q for q in QUESTIONS[:2]]
    engine.reconfigure(block_size=4, enable_prefix_caching=False)
    ref, _ = _run(engine, prompts, n=3)
    engine.reconfigure(enable_prefix_caching=True)
    _run(engine, prompts, n=3)
    got, _ = _run(engine, prompts, n=3)
    assert got == ref
    engine.add_request("lp", prompts[0], SamplingParams(max_tokens=1, prompt_logprobs=0))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    assert out.num_cached_tokens == 0 and all(e is not None for e in out.prompt_logprobs[1:])
