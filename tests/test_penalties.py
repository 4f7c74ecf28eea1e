"""Penalties, min_p and logit_bias: offline against HF transformers' processors, and through the server."""

from __future__ import annotations

import pytest
import torch

from sarathi import SamplingParams
from sarathi.model.sampler import sample
from sarathi.scheduler import SamplingSpec
from tests.conftest import PROMPTS, hf_greedy


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers(llm, hf_model, penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    tok = llm.get_tokenizer()
    prompts = PROMPTS[:2]
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    refs = [hf_greedy(hf_model, tok.encode(p), 16, proc) for p in prompts]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                repetition_penalty=penalty))
    assert [o.outputs[0].token_ids for o in outs] == refs
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in plain] != refs  # the penalty really changed something


def test_frequency_and_presence_penalties_follow_openai_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    out_ids = (3, 3, 3, 7, 9)
    specs = [SamplingSpec(frequency_penalty=0.5, output_token_ids=out_ids),
             SamplingSpec(presence_penalty=1.5, output_token_ids=out_ids),
             SamplingSpec(frequency_penalty=-0.25, presence_penalty=0.75, output_token_ids=out_ids)]
    want = logits.clone()
    counts = torch.bincount(torch.tensor(out_ids), minlength=50).float()
    for i, sp in enumerate(specs):
        want[i] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).float()
    got = logits.clone()
    res = sample(got, specs, g)
    assert torch.allclose(got, want)  # the sampler edits the logits in place, then takes the argmax
    assert res.token_ids == want.argmax(-1).tolist()


def test_logit_bias_and_min_p(llm):
    forced = llm.get_tokenizer().encode(" banana")[0]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.9, seed=3, max_tokens=6, ignore_eos=True,
                                                    logit_bias={forced: 100.0}))[0].outputs[0]
    assert out.token_ids == [forced] * 6
    banned = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    first = banned[0].outputs[0].token_ids[0]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                    logit_bias={first: -100.0}))[0].outputs[0]
    assert first not in out.token_ids
    # min_p = 1 keeps only the most likely token: sampling at any temperature becomes greedy.
    greedy = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True))]
    mp = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], SamplingParams(
        temperature=1.5, min_p=1.0, seed=11, max_tokens=8, ignore_eos=True))]
    assert mp == greedy


@pytest.mark.parametrize("kwargs,field", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(min_p=1.5), "min_p"),
    (dict(logit_bias={1: 101}), "logit_bias"),
    (dict(logit_bias={-1: 1}), "logit_bias"),
])
def test_penalty_ranges(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_logit_bias_outside_vocab_is_rejected(engine):
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("b", "Hi", SamplingParams(logit_bias={engine.model_config.vocab_size: 1.0}))
