"""One request never harms another: validation at the door, and failures pinned to their request."""

from __future__ import annotations

import pytest

from sarathi import SamplingParams
from sarathi.model import sampler as sampler_mod
from tests.test_engine import run_all

INNOCENT = ["The capital of France is", "Water boils at", "Once upon a time, in a small village,",
            "def add(a, b):\n    return"]


def _solo_tokens(engine, prompts: list[str], max_tokens: int) -> list[list[int]]:
    out = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"solo{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                              ignore_eos=True))
        out.append(run_all(engine)[f"solo{i}"].outputs[0].token_ids)
    return out


@pytest.mark.parametrize("where", ["sampler", "model"])
def test_failing_request_does_not_fail_its_batch_mates(engine, monkeypatch, where):
    """A request that breaks the shared step (in the sampler or the model) is finished with an error;
    the innocents batched with it get exactly the greedy tokens they get alone."""
    want = _solo_tokens(engine, INNOCENT, 8)
    failed_before = sum(r.num_failed for r in engine.stats.steps)
    culprit_seed = 4242

    if where == "sampler":
        real_sample = sampler_mod.sample

        def bad_sample(logits, specs, *a, **kw):
            if any(sp.seed == culprit_seed for sp in specs):
                raise IndexError("injected sampler failure")
            return real_sample(logits, specs, *a, **kw)

        monkeypatch.setattr("sarathi.executor.local.sample", bad_sample)
    else:
        real_exec = engine.executor.execute

        def bad_execute(plan):
            if any(sp.req_id.startswith("bad") for sp in plan.seqs):
                raise RuntimeError("injected model failure")
            return real_exec(plan)

        monkeypatch.setattr(engine.executor, "execute", bad_execute)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, prompt in enumerate(INNOCENT[:2]):
        engine.add_request(f"ok{i}", prompt, greedy)
    # The culprit arrives in the middle of the batch (n = 2: both of its sequences must stop).
    engine.add_request("bad", "Tell me a story", SamplingParams(temperature=0.8, seed=culprit_seed,
                                                                max_tokens=8, n=2))
    for i, prompt in enumerate(INNOCENT[2:], start=2):
        engine.add_request(f"ok{i}", prompt, greedy)
    final = run_all(engine)
    bad = final["bad"]
    assert bad.finished and bad.error and "injected" in bad.error
    assert [c.finish_reason for c in bad.outputs] == ["error", "error"]
    for i in range(len(INNOCENT)):
        out = final[f"ok{i}"]
        assert out.error is None and out.outputs[0].token_ids == want[i], i
    assert sum(r.num_failed for r in engine.stats.steps) - failed_before == 1
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("params,field", [
    (dict(seed=2**64, temperature=0.8), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(temperature=1e30), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=10**400), "temperature"),
    (dict(top_k=10**12), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(logprobs=10**9), "logprobs"),
    (dict(stop=["x"] * 65), "stop"),
    (dict(stop=5), "stop"),
    (dict(stop_token_ids=[1] * 1025), "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(n=True), "n"),
])
def test_out_of_range_sampling_params_are_rejected(params, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**params)


def test_engine_rejects_ids_outside_the_vocabulary(engine):
    vocab = engine.model_config.vocab_size
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("s", "Hello", SamplingParams(stop_token_ids=[vocab], min_tokens=2, max_tokens=4))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("p", [1, vocab], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished_requests()


def test_extreme_but_valid_values_run_beside_innocents(engine):
    """The largest accepted values (64-bit seed, top_k past the vocabulary, temperature 100, a
    stop token id at the vocabulary's end with min_tokens) run in one batch with a greedy request."""
    want = _solo_tokens(engine, INNOCENT[:1], 6)[0]
    vocab = engine.model_config.vocab_size
    extreme = [
        SamplingParams(seed=2**64 - 1, temperature=0.8, max_tokens=6, n=2),
        SamplingParams(seed=-(2**63), temperature=100.0, top_k=2**31 - 1, max_tokens=6),
        SamplingParams(temperature=0.5, top_p=1e-9, stop_token_ids=[vocab - 1, 0], min_tokens=3,
                       max_tokens=6, logprobs=20),
    ]
    engine.add_request("innocent", INNOCENT[0], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for i, p in enumerate(extreme):
        engine.add_request(f"x{i}", "Hello", p)
    final = run_all(engine)
    assert final["innocent"].outputs[0].token_ids == want
    assert all(final[f"x{i}"].error is None for i in range(len(extreme)))
    assert all(len(c.token_ids) >= 3 for i in range(len(extreme)) for c in final[f"x{i}"].outputs)


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine):
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    engine.add_request("alone", "Once upon a time", p)
    alone = run_all(engine)["alone"].outputs[0].token_ids
    for i, prompt in enumerate(INNOCENT):
        engine.add_request(f"o{i}", prompt, SamplingParams(temperature=0.9, max_tokens=8))
    engine.add_request("batched", "Once upon a time", p)
    assert run_all(engine)["batched"].outputs[0].token_ids == alone
