"""Structured outputs (xgrammar): validation, masks in the sampler, the engine's lifecycle (chunked
prefills, n / best_of, preemption, failure isolation), many real generations checked with jsonschema,
and the server's response_format / guided_* / structured_outputs fields through the openai client."""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from typing import Any

import jsonschema
import pytest
import torch

from sarathi import SamplingParams
from sarathi.errors import InvalidArgument
from sarathi.sampling_params import StructuredOutputsParams as SO
from sarathi.scheduler.plan import SamplingSpec

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {"type": "object", "required": ["name", "age"],
               "properties": {"name": {"type": "string", "maxLength": 10},
                              "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    "city": {"type": "object", "required": ["city", "country", "big"],
             "properties": {"city": {"type": "string", "maxLength": 12},
                            "country": {"enum": ["France", "Italy", "Spain", "Japan", "Other"]},
                            "big": {"type": "boolean"}}},
    "colors": {"type": "object", "required": ["colors"],
               "properties": {"colors": {"type": "array", "minItems": 1, "maxItems": 3,
                                         "items": {"type": "string", "maxLength": 8}}}},
    "answer": {"type": "object", "required": ["answer", "confidence"],
               "properties": {"answer": {"type": "boolean"},
                              "confidence": {"type": "integer", "minimum": 0, "maximum": 100}}},
}
QUESTIONS = {"person": ["Describe a person as JSON.", "Invent a character for a story, as JSON."],
             "city": ["Name a city as JSON.", "Which city is the capital of Italy? Answer in JSON."],
             "colors": ["List some colours as JSON.", "What colours does a rainbow have? JSON please."],
             "answer": ["Is the sky blue? Answer as JSON.", "Is 7 a prime number? Answer as JSON."]}
WORDS = r"[A-Z][a-z]{2,8} (is|was) \d{1,3}"
DATE = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
PLAIN = ["The capital of France is", "My favourite food is", "Once upon a time", "The weather today is"]


def chat(llm, question: str) -> str:
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": question}])


def gen(llm, prompts: list[str], params: list[SamplingParams] | SamplingParams) -> list[Any]:
    return llm.generate(prompts, params, use_tqdm=False)


# ---- validation (no model) ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(json={"type": "foo"}), "structured_outputs.json"),
    (dict(json="{not json"), "structured_outputs.json"),
    (dict(json=[1, 2]), "structured_outputs.json"),
    (dict(json={"type": "string", "pattern": "(("}), "structured_outputs.json"),
    (dict(regex="(("), "structured_outputs.regex"),
    (dict(regex="(?=a)b"), "structured_outputs.regex"),
    (dict(regex=""), "structured_outputs.regex"),
    (dict(grammar="root ::= "), "structured_outputs.grammar"),
    (dict(grammar='start: "a"'), "structured_outputs.grammar"),
    (dict(grammar='root ::= b'), "structured_outputs.grammar"),
    (dict(choice=[]), "structured_outputs.choice"),
    (dict(choice="yes"), "structured_outputs.choice"),
    (dict(choice=["a", 1]), "structured_outputs.choice"),
    (dict(), "structured_outputs"),
    (dict(json_object=False), "structured_outputs"),
    (dict(regex="a", choice=["a"]), "structured_outputs.choice"),
    (dict(json_object=1), "structured_outputs.json_object"),
    (dict(json_object=True, whitespace_pattern=" "), "structured_outputs.whitespace_pattern"),
    (dict(json_object=True, disable_any_whitespace=1), "structured_outputs.disable_any_whitespace"),
])
def test_bad_specs_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        SO(**kwargs)
    assert e.value.field == field and str(e.value).startswith(field), str(e.value)
    assert "/project/cpp" not in str(e.value)  # xgrammar's log prefix is stripped


def test_specs_are_canonical_and_sampling_params_take_dicts():
    a = SO(json={"b": 1, "type": "object"})
    b = SO(json='{"b": 1, "type": "object"}')
    assert a.kind == "json" and a.cache_key == b.cache_key  # key order kept: properties order matters
    assert SO(json={"type": "object", "b": 1}).cache_key != a.cache_key
    assert SO(choice=["x", "y", "x"]).spec == ["x", "y"]
    assert SO(json_object=True).kind == "json_object"
    assert SO(json_object=True).cache_key != SO(json_object=True, disable_any_whitespace=True).cache_key
    p = SamplingParams(structured_outputs={"regex": "[ab]+"})
    assert isinstance(p.structured_outputs, SO) and p.structured_outputs.kind == "regex"
    for bad in ({"regex": "[ab]+", "nope": 1}, "regex"):
        with pytest.raises(InvalidArgument) as e:
            SamplingParams(structured_outputs=bad)
        assert e.value.field == "structured_outputs"


def _mask(allowed: list[int], vocab: int) -> bytes:
    """A token bitmask as the scheduler sends it: bit t % 32 of int32 word t // 32 set = allowed."""
    words = [0] * ((vocab + 31) // 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return struct.pack(f"<{len(words)}I", *words)


def test_sampler_masks_only_constrained_rows_and_grammar_beats_min_tokens():
    from sarathi.model.sampler import sample

    vocab = 100
    torch.manual_seed(0)
    logits = torch.randn(4, vocab)
    orig = logits.clone()
    specs = [SamplingSpec(), SamplingSpec(token_bitmask=_mask([5, 63, 64, 99], vocab)),
             SamplingSpec(temperature=1.0, seed=3, token_bitmask=_mask([31, 32], vocab)),
             # the grammar allows only EOS (7) but min_tokens bans it: the ban yields
             SamplingSpec(banned=(7,), token_bitmask=_mask([7], vocab))]
    out = sample(logits, specs, torch.Generator().manual_seed(0))
    assert out.token_ids[0] == int(orig[0].argmax())
    assert out.token_ids[1] == max([5, 63, 64, 99], key=lambda t: float(orig[1, t]))
    assert out.token_ids[2] in (31, 32) and out.token_ids[3] == 7
    assert torch.equal(logits[0], orig[0])  # an unconstrained row is untouched
    assert torch.isneginf(logits[1, [0, 6, 62, 65, 98]]).all()
    with pytest.raises(ValueError, match="allows no token"):
        sample(torch.randn(1, vocab), [SamplingSpec(token_bitmask=_mask([], vocab))], torch.Generator())


def test_compiled_grammars_are_cached_with_a_bounded_lru(llm):
    from sarathi.structured import StructuredOutputs

    eng = llm.engine
    so = StructuredOutputs(eng.tokenizer, eng.model_config.vocab_size, eng.eos_token_ids, cache_entries=2)
    specs = [SO(regex="a+"), SO(regex="b+"), SO(choice=["x", "y"])]
    compiled = [so.compile(s) for s in specs]
    assert so.misses == 3 and so.num_cached == 2
    assert so.compile(SO(choice=["x", "y"])) is compiled[2] and so.hits == 1
    so.compile(SO(regex="a+"))  # evicted earlier: compiled again
    assert so.misses == 4 and so.num_cached == 2


def test_refused_where_the_executor_cannot_apply_masks(engine, monkeypatch):
    from sarathi.executor.pipeline import PipelineExecutor
    from sarathi.executor.simulated import SimulatedExecutor

    assert PipelineExecutor.supports_structured_outputs  # its last rank does it (tests/test_pipeline.py)
    assert not getattr(SimulatedExecutor, "supports_structured_outputs", False)
    monkeypatch.setattr(engine.input, "structured", None)
    so = SO(json_object=True)
    with pytest.raises(InvalidArgument) as e:
        engine.make_request("x", "Hi", SamplingParams(structured_outputs=so))
    assert e.value.field == "structured_outputs"
    so.field_name = "response_format"  # what the server sets: the field the client sent
    with pytest.raises(InvalidArgument) as e:
        engine.make_request("x", "Hi", SamplingParams(structured_outputs=so))
    assert e.value.field == "response_format" and str(e.value).startswith("response_format:")


# ---- real generations ------------------------------------------------------------------------
def test_json_schemas_over_many_generations(llm, engine):
    """64 generations (4 schemas x 2 prompts x greedy and 3 seeded samplings x free / compact
    whitespace), batched together: every one that stops is valid for its schema; most stop."""
    prompts, params, schemas = [], [], []
    for name, schema in SCHEMAS.items():
        for q in QUESTIONS[name]:
            for temp, seed in [(0.0, None), (0.7, 1), (0.7, 2), (1.0, 3)]:
                for compact in (False, True):
                    prompts.append(chat(llm, q))
                    schemas.append(schema)
                    so = SO(json=schema, disable_any_whitespace=compact)
                    params.append(SamplingParams(temperature=temp, seed=seed, max_tokens=48,
                                                 structured_outputs=so))
    outs = gen(llm, prompts, params)
    reasons = Counter()
    for schema, o in zip(schemas, outs):
        c = o.outputs[0]
        reasons[c.finish_reason] += 1
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
            assert c.token_ids[-1] in llm.engine.eos_token_ids
        else:
            assert c.finish_reason == "length", (c.finish_reason, o.error)
    assert sum(reasons.values()) == 64 and reasons["stop"] >= 56, reasons


def test_json_object_regex_choice_and_grammar(llm, engine):
    cases = [
        (SO(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (SO(json_object=True, disable_any_whitespace=True), lambda t: isinstance(json.loads(t), dict)),
        (SO(regex=DATE), lambda t: re.fullmatch(DATE, t)),
        (SO(regex=WORDS), lambda t: re.fullmatch(WORDS, t)),
        (SO(choice=["Paris", "London", "Rome", 'a "quoted"\nchoice']),
         lambda t: t in ("Paris", "London", "Rome", 'a "quoted"\nchoice')),
        (SO(grammar='root ::= "The answer is " ("yes" | "no") "."'),
         lambda t: t in ("The answer is yes.", "The answer is no.")),
        (SO(grammar='root ::= item ("," item){0,2}\nitem ::= [a-z]{1,6}'),
         lambda t: re.fullmatch(r"[a-z]{1,6}(,[a-z]{1,6}){0,2}", t)),
    ]
    prompts, params, checks = [], [], []
    for so, check in cases:
        for prompt in (chat(llm, "Give me an example."), PLAIN[0]):
            for temp, seed in [(0.0, None), (0.9, 7)]:
                prompts.append(prompt)
                params.append(SamplingParams(temperature=temp, seed=seed, max_tokens=40,
                                             structured_outputs=so))
                checks.append(check)
    outs = gen(llm, prompts, params)
    stops = 0
    for check, o in zip(checks, outs):
        c = o.outputs[0]
        if c.finish_reason == "stop":
            stops += 1
            assert check(c.text), repr(c.text)
    assert stops >= len(outs) - 4, [o.outputs[0].text for o in outs]


def test_unconstrained_batch_mate_gets_its_solo_greedy_tokens(llm, engine):
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    solo = [o.outputs[0].token_ids for o in gen(llm, PLAIN, plain)]
    constrained = SamplingParams(temperature=0.8, seed=1, max_tokens=16,
                                 structured_outputs=SO(json=SCHEMAS["person"]))
    outs = gen(llm, [p for p in PLAIN for _ in range(2)], [plain, constrained] * len(PLAIN))
    assert [o.outputs[0].token_ids for o in outs[0::2]] == solo
    solo_c = [o.outputs[0].token_ids for o in gen(llm, PLAIN, constrained)]
    assert [o.outputs[0].token_ids for o in outs[1::2]] == solo_c  # seeded: batch-independent too


def test_n_and_best_of_each_sequence_follows_its_own_grammar(llm, engine):
    schema = SCHEMAS["city"]
    so = SO(json=schema, disable_any_whitespace=True)
    p = SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=40, structured_outputs=so)
    q = SamplingParams(n=2, best_of=4, temperature=0.8, seed=5, max_tokens=40, structured_outputs=so)
    outs = gen(llm, [chat(llm, QUESTIONS["city"][0])] * 2, [p, q])
    assert [len(o.outputs) for o in outs] == [3, 2]
    texts = [c.text for o in outs for c in o.outputs]
    for o in outs:
        for c in o.outputs:
            assert c.finish_reason == "stop", texts
            jsonschema.validate(json.loads(c.text), schema)
    assert len(set(texts[:3])) > 1, texts  # different samples, each complete


def test_min_tokens_and_ignore_eos_yield_to_the_end_of_the_grammar(llm, engine):
    so = SO(choice=["yes", "no"])
    outs = gen(llm, [PLAIN[0]] * 2,
               [SamplingParams(temperature=0, min_tokens=5, max_tokens=10, structured_outputs=so),
                SamplingParams(temperature=0, ignore_eos=True, max_tokens=10, structured_outputs=so)])
    for o in outs:
        assert o.outputs[0].finish_reason == "stop" and o.outputs[0].text in ("yes", "no")


@pytest.mark.parametrize("cfg", [dict(scheduler="sarathi", chunk_size=8, num_kv_blocks=12, block_size=4),
                                 dict(scheduler="vllm", num_kv_blocks=12, block_size=4)],
                         ids=["sarathi", "vllm"])
def test_chunked_prefill_and_preemption_keep_the_matcher_in_step(llm, engine, cfg):
    """Prompts in 8-token chunks (only the last chunk samples) and a KV cache so small that requests are
    preempted and recomputed (generated tokens included, as prompt): the matcher follows the generated
    tokens, so the greedy outputs equal those of a roomy configuration."""
    schemas = list(SCHEMAS.values())
    prompts = [f"{PLAIN[i % 4]} (example {i}). As JSON:" for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=30,
                             structured_outputs=SO(json=schemas[i % 4], disable_any_whitespace=True))
              for i in range(6)]
    ref = [o.outputs[0] for o in gen(llm, prompts, params)]
    engine.reconfigure(**cfg)
    outs = [o.outputs[0] for o in gen(llm, prompts, params)]
    assert engine.scheduler.num_preemptions > 0, "the small KV cache should have forced preemption"
    assert [c.token_ids for c in outs] == [c.token_ids for c in ref]
    assert [c.finish_reason for c in outs] == [c.finish_reason for c in ref]
    assert sum(c.finish_reason == "stop" for c in outs) >= 4
    for i, c in enumerate(outs):
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schemas[i % 4])


def test_failure_isolation_does_not_advance_matchers_twice(llm, engine, monkeypatch):
    """A batch-mate fails mid-decode: the step is re-run in halves; each constrained request's matcher
    advances once per token, so its tokens equal those of a run without the failure."""
    from tests.test_engine import run_all

    params = {f"c{i}": SamplingParams(temperature=0.7, seed=i, max_tokens=30,
                                       structured_outputs=SO(json=SCHEMAS["person"]))
              for i in range(3)}
    prompt = chat(llm, QUESTIONS["person"][0])
    ref = {rid: o.outputs[0].token_ids for rid, o in
           zip(params, gen(llm, [prompt] * 3, list(params.values())))}
    real = engine.executor.execute
    failed = []

    def failing(plan: Any) -> Any:
        if any(s.req_id == "bad" and s.sample is not None and s.sample.position == 4 for s in plan.seqs):
            failed.append(len(plan.seqs))
            raise RuntimeError("injected model failure")
        return real(plan)

    monkeypatch.setattr(engine.executor, "execute", failing)
    for rid, p in params.items():
        engine.add_request(rid, prompt, p)
    engine.add_request("bad", "Tell me a story",
                       SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    final = run_all(engine)
    assert failed and failed[0] == 4, failed  # the whole step failed first, then its halves
    assert final["bad"].error and "injected" in final["bad"].error
    for rid in params:
        assert final[rid].error is None
        assert final[rid].outputs[0].token_ids == ref[rid]


# ---- the server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(llm):
    from tests.test_server import running_server

    llm.engine.reconfigure(scheduler="sarathi", chunk_size=None, num_kv_blocks=None)
    with running_server(llm.engine) as srv:
        yield srv


MODEL = "SmolLM2-135M-Instruct"


def test_server_response_format_and_guided_fields(server):
    client = server.openai()
    schema = SCHEMAS["person"]
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=48, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, temperature=0.8, seed=3,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                  extra_body={"guided_choice": ["Paris", "Lyon"]})
    assert r.choices[0].text in ("Paris", "Lyon") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="Today's date is", max_tokens=16, temperature=0.5,
                                  seed=2, n=2,
                                  extra_body={"guided_regex": DATE, "guided_decoding_backend": "xgrammar"})
    assert all(re.fullmatch(DATE, c.text) for c in r.choices), [c.text for c in r.choices]
    r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=8, temperature=0,
                                  extra_body={"guided_grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(model=MODEL, prompt="A city:", max_tokens=48, temperature=0,
                                  extra_body={"structured_outputs": {"json": SCHEMAS["city"],
                                                                     "disable_any_whitespace": True}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["city"])
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=48, temperature=0,
                                       extra_body={"guided_json": json.dumps(schema)})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                       response_format={"type": "text"})  # no constraint
    assert r.choices[0].message.content


def test_server_streams_structured_output(server):
    client = server.openai()
    schema = SCHEMAS["answer"]
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is the sky blue? Answer as JSON."}],
        max_tokens=48, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"guided_json": {"type": "object", "properties": {"a": 5}}}, "guided_json"),
    ({"guided_json": "{oops"}, "guided_json"),
    ({"guided_regex": "(("}, "guided_regex"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"guided_choice": "yes"}, "guided_choice"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs.regex"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"], "structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"structured_outputs": {"regex": "a"}, "guided_json": {}}, "guided_json"),
    ({"guided_regex": "a+", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"guided_json": {}, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
])
@pytest.mark.parametrize("chat_api", [True, False], ids=["chat", "completions"])
def test_server_bad_structured_fields_are_400s_naming_the_field(server, body, param, chat_api):
    base = ({"messages": [{"role": "user", "content": "Hi"}]} if chat_api else {"prompt": "Hi"})
    with server.client() as http:
        r = http.post("/v1/chat/completions" if chat_api else "/v1/completions",
                      json={"model": MODEL, "max_tokens": 4, **base, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"].startswith(param), err
