"""Forced tool calls (``tool_choice: "required"`` and a named function): the parsers (complete and
streamed at every split), the constraint, and real generations of the default model through the server
and the openai client, whose calls must name a tool and carry arguments valid against its schema."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from sarathi.errors import InvalidArgument
from sarathi.server.forced_tools import NamedToolParser, RequiredToolParser, forced_constraint
from tests.test_chat_templates import TOOLS, WEATHER
from tests.test_tools import accumulate, chat, collect_stream, ids, tool_server  # noqa: F401


def parsed(parser: Any, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    msg = parser.parse(text)
    return msg.content, [(t.name, t.arguments) for t in msg.tool_calls]


# ---- parsers -------------------------------------------------------------------------------------
REQUIRED_CASES = [
    ('[{"name": "get_weather", "parameters": {"city": "Zürich"}}]', None,
     [("get_weather", '{"city": "Zürich"}')]),
    ('[{"name":"get_weather","parameters":{"city":"Bern"}}, {"name":"get_time","parameters":{"tz":"UTC"}}]',
     None, [("get_weather", '{"city": "Bern"}'), ("get_time", '{"tz": "UTC"}')]),
    ('\n[\n {"name": "get_time", "parameters": {}}\n]\n', None, [("get_time", "{}")]),
    # cut by max_tokens inside the second call: the first is a call, the rest is not dropped
    ('[{"name": "get_time", "parameters": {"tz": "UTC"}}, {"name": "get_we', '{"name": "get_we',
     [("get_time", '{"tz": "UTC"}')]),
    ('[{"name": "get_ti', '[{"name": "get_ti', []),
    ("", "", []),
]


@pytest.mark.parametrize("text,content,calls", REQUIRED_CASES)
def test_required_parser(text, content, calls):
    assert parsed(RequiredToolParser(new_id=ids()), text) == (content, calls)


def test_required_parser_max_calls():
    text = '[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {}}]'
    assert parsed(RequiredToolParser(max_calls=1, new_id=ids()), text) == (None, [("a", "{}")])


@pytest.mark.parametrize("text,content,calls", [
    ('{"city": "Zürich", "unit": "celsius"}', None,
     [("get_weather", '{"city": "Zürich", "unit": "celsius"}')]),
    ('{"city": "Zür', None, [("get_weather", '{"city": "Zür')]),  # cut: the arguments as written (vLLM)
    ("", None, [("get_weather", "")]),  # still the forced call
])
def test_named_parser(text, content, calls):
    assert parsed(NamedToolParser("get_weather", new_id=ids()), text) == (content, calls)


@pytest.mark.parametrize("make,text", [
    (lambda: RequiredToolParser(new_id=ids()), REQUIRED_CASES[1][0]),
    (lambda: RequiredToolParser(new_id=ids()), REQUIRED_CASES[3][0]),
    (lambda: NamedToolParser("get_weather", new_id=ids()), '{"city": "Zürich", "unit": "celsius"}'),
])
def test_streaming_at_every_split_equals_the_whole(make, text):
    whole = make().parse(text)
    want = (whole.content or "", [{"id": t.id, "name": t.name, "arguments": t.arguments}
                                  for t in whole.tool_calls])
    for cut in range(len(text) + 1):
        s = make().stream()
        deltas = s.feed(text[:cut]) + s.feed(text[cut:]) + s.finish()
        assert accumulate(deltas) == want, cut


def test_finish_reasons():
    assert RequiredToolParser().finish_reason("stop") == "tool_calls"
    assert NamedToolParser("f").finish_reason("stop") == "stop"  # OpenAI's answer to a forced function
    assert RequiredToolParser().finish_reason("length") == "length"


def test_constraint_names_the_tool_with_a_bad_schema():
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}
    with pytest.raises(InvalidArgument) as e:
        forced_constraint("required", [WEATHER, bad], True)
    assert e.value.field == "tools.1.function.parameters"
    with pytest.raises(InvalidArgument) as e:
        forced_constraint({"type": "function", "function": {"name": "f"}}, [WEATHER, bad], True)
    assert e.value.field == "tools.1.function.parameters"


# ---- real generations through the server -------------------------------------------------------------
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("parallel", [True, False])
def test_required_forces_valid_calls(tool_server, stream, parallel):  # noqa: F811
    client = tool_server.openai()
    for user in ("What's the weather in Zürich?", "What time is it in Tokyo?"):
        kw: dict[str, Any] = {"messages": [{"role": "user", "content": user}], "tools": TOOLS,
                              "tool_choice": "required", "max_tokens": 96,
                              "extra_body": {"ignore_eos": False}}
        if not parallel:
            kw["parallel_tool_calls"] = False
        out = chat(client, "", stream=stream, **kw)
        if stream:
            msg = collect_stream(out)
            calls, finish, content = msg["tool_calls"], msg["finish_reason"], msg["content"]
        else:
            m = out.choices[0].message
            calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                     for t in m.tool_calls or []]
            finish, content = out.choices[0].finish_reason, m.content
        assert finish == "tool_calls" and not content, (finish, content)
        assert calls and (parallel or len(calls) == 1)
        for c in calls:
            assert c["id"].startswith("call_")
            check_call(c["name"], c["arguments"])


@pytest.mark.parametrize("stream", [False, True])
def test_named_function_forces_its_arguments(tool_server, stream):  # noqa: F811
    client = tool_server.openai()
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = chat(client, "", stream=stream, messages=[{"role": "user", "content": "Weather in Bern?"}],
               tools=TOOLS, tool_choice=choice, max_tokens=96, extra_body={"ignore_eos": False})
    if stream:
        msg = collect_stream(out)
        calls, finish = msg["tool_calls"], msg["finish_reason"]
        first = next(d for d in msg["deltas"] if d.tool_calls)  # the header comes before any argument
        assert first.tool_calls[0].function.name == "get_weather"
    else:
        t = out.choices[0].message.tool_calls
        calls = [{"name": x.function.name, "arguments": x.function.arguments} for x in t]
        finish = out.choices[0].finish_reason
        assert out.choices[0].message.content is None
    assert finish == "stop" and len(calls) == 1 and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"extra_body": {"guided_regex": "a+"}}, "guided_regex"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]},
     "tools.1.function.parameters"),
])
def test_forced_tool_choice_conflicts_are_400(tool_server, extra, param):  # noqa: F811
    kw: dict[str, Any] = {"tools": TOOLS, "tool_choice": "required", **extra}
    with pytest.raises(openai.BadRequestError) as e:
        chat(tool_server.openai(), "x", **kw)
    assert e.value.body["param"] == param, e.value.body


# ---- offline: LLM.chat(tools=...) ----------------------------------------------------------------------
def test_llm_chat_renders_tools(llm):
    from sarathi import SamplingParams
    from tests.test_chat_templates import QWEN25

    msgs = [{"role": "user", "content": "Weather in Bern?"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=1), chat_template=QWEN25, tools=TOOLS, use_tqdm=False)[0]
    assert out.prompt == llm.engine.tokenizer.apply_chat_template(msgs, True, QWEN25, tools=TOOLS)
    assert '"name": "get_weather"' in out.prompt
    with pytest.raises(InvalidArgument) as e:  # SmolLM2's own template never reads `tools`
        llm.chat(msgs, SamplingParams(max_tokens=1), tools=TOOLS, use_tqdm=False)
    assert e.value.field == "tools"
    with pytest.raises(InvalidArgument) as e:
        llm.chat(msgs, tools=[{"type": "function", "function": {"name": "bad name"}}], chat_template=QWEN25)
    assert e.value.field == "tools.0.function.name"
    with pytest.raises(InvalidArgument) as e:
        llm.chat(msgs, continue_final_message=True)  # with add_generation_prompt left True
    assert e.value.field == "continue_final_message"
