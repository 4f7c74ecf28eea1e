"""Sampling behaviour on the real model: seeds, top-k/top-p, stops, logprobs, n > 1, chat."""

from __future__ import annotations

import math

from sarathi import SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time", "List three fruits:"]


def texts(outs):
    return [[c.text for c in o.outputs] for o in outs]


def test_seeded_sampling_reproduces_regardless_of_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234)
    alone = llm.generate([PROMPTS[0]], p)
    together = llm.generate(PROMPTS, [p, SamplingParams(temperature=1.2, max_tokens=12),
                                      SamplingParams(temperature=0.7, max_tokens=5, seed=9)])
    again = llm.generate([PROMPTS[0]], p)
    assert alone[0].outputs[0].token_ids == together[0].outputs[0].token_ids == again[0].outputs[0].token_ids


def test_different_seeds_differ_and_unseeded_engine_is_deterministic(llm):
    outs = llm.generate([PROMPTS[1]] * 4, [SamplingParams(temperature=1.5, max_tokens=16, seed=s)
                                             for s in range(4)])
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 1


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))
    topk1 = llm.generate(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_tokens=10, seed=5))
    assert texts(greedy) == texts(topk1)


def test_tiny_top_p_equals_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10))
    nucleus = llm.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10))
    assert texts(greedy) == texts(nucleus)


def test_stop_string_cuts_text(llm):
    full = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    # pick a stop string from the middle of the greedy text
    stop = full.text[6:9]
    assert stop and stop in full.text
    cut = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0]
    c = cut.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == full.text[: full.text.index(stop)]
    kept = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20, stop=stop,
                                                      include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(llm):
    full = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 8
    tok = full.token_ids[3]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=8,
                                                    stop_token_ids=[tok]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    assert out.token_ids == full.token_ids[: full.token_ids.index(tok) + 1]


def test_eos_stops_unless_ignored_and_min_tokens(llm):
    chat = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=64))
    c = chat[0].outputs[0]
    assert c.finish_reason == "stop" and c.text.strip()
    eos = llm.engine.eos_token_ids
    assert c.token_ids[-1] in eos
    n = len(c.token_ids)
    forced = llm.chat([{"role": "user", "content": "Say hi."}],
                      SamplingParams(temperature=0, max_tokens=n + 6, min_tokens=n + 3))[0].outputs[0]
    assert len(forced.token_ids) >= n + 3
    assert not any(t in eos for t in forced.token_ids[: n + 2])
    ignored = llm.chat([{"role": "user", "content": "Say hi."}],
                       SamplingParams(temperature=0, max_tokens=n + 4, ignore_eos=True))[0].outputs[0]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == n + 4


def test_logprobs_shape_and_values(llm):
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 5
    total = 0.0
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and lp[tok].rank == 1  # greedy picks the top token
        assert 3 <= len(lp) <= 4
        assert all(v.logprob <= 0 for v in lp.values())
        ranked = sorted((v.rank, v.logprob) for v in lp.values())
        assert [lp_ for _, lp_ in ranked] == sorted((v.logprob for v in lp.values()), reverse=True)
        total += lp[tok].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-5)


def test_n_greater_than_one(llm):
    out = llm.generate([PROMPTS[1]], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    again = llm.generate([PROMPTS[1]], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7))[0]
    assert texts([out]) == texts([again])
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_outputs_in_input_order_and_text_matches_tokens(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    tok = llm.get_tokenizer()
    for prompt, o in zip(PROMPTS, outs):
        assert o.prompt == prompt
        assert o.prompt_token_ids == tok.encode(prompt)
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids)
