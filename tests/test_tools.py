"""Tools: the hermes tool-call parser (complete, streamed at every split), and ``tools`` / ``tool_choice``
through the real server and the real openai client. The 135M default model does not write tool calls on
its own, so the server tests script the text of its outputs (``scripted``): requests, rendering,
generation, parsing and streaming are the server's own; only the words are chosen."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import openai
import pytest

from sarathi.cli import main
from sarathi.server.tool_parsers import HermesToolParser, ToolCall
from tests.test_chat_templates import QWEN25, TOOLS
from tests.test_server import running_server

# ruff: noqa: E501  (long tool-call literals read better whole)

# ---- the parser ----------------------------------------------------------------------------------
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}\n</tool_call>'
WEATHER_ARGS = '{"city": "Zürich", "unit": "celsius"}'


def ids() -> Any:
    """Deterministic call ids, so that two parses can be compared."""
    counter = iter(range(1000))
    return lambda: f"call_{next(counter)}"


def parse(text: str, **kw: Any) -> tuple[str | None, list[tuple[str, str]]]:
    msg = HermesToolParser(new_id=ids(), **kw).parse(text)
    return msg.content, [(t.name, t.arguments) for t in msg.tool_calls]


# (output text, content, [(name, arguments)])
CASES = [
    (WEATHER_CALL, None, [("get_weather", WEATHER_ARGS)]),
    ("I'll check.\n" + WEATHER_CALL, "I'll check.\n", [("get_weather", WEATHER_ARGS)]),
    (WEATHER_CALL + "\n" + TIME_CALL, None, [("get_weather", WEATHER_ARGS), ("get_time", '{"tz": "Asia/Tokyo"}')]),
    ("\n\n" + WEATHER_CALL + "\n", None, [("get_weather", WEATHER_ARGS)]),
    ("A" + WEATHER_CALL + "B" + TIME_CALL + "C", "ABC",
     [("get_weather", WEATHER_ARGS), ("get_time", '{"tz": "Asia/Tokyo"}')]),
    # Hermes 2 Pro's own template writes the arguments first
    ('<tool_call>\n{ "arguments": {"tz": "UTC"}, "name": "get_time"}\n</tool_call> ', None,
     [("get_time", '{"tz": "UTC"}')]),
    # compact JSON is re-serialized as vLLM does; nested values survive
    ('<tool_call>{"name":"f","arguments":{"a":[1,{"b":null}],"c":"</x>"}}</tool_call>', None,
     [("f", '{"a": [1, {"b": null}], "c": "</x>"}')]),
    # the arguments as a JSON string holding the object, or left out
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", '{"a": 1}')]),
    ('<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", "{}")]),
    # cut by the end of the output after complete JSON: still a call (vLLM's <tool_call>(.*) rule)
    ('<tool_call>\n{"name": "f", "arguments": {}}\n', None, [("f", "{}")]),
    # no call: the text unchanged, whitespace and look-alikes included
    ("  Hello <b>there</b> a < b <tool x", "  Hello <b>there</b> a < b <tool x", []),
    ("\n \n", "\n \n", []),
    ("", "", []),
    ("ends with <tool_ca", "ends with <tool_ca", []),
]
MALFORMED = [
    '<tool_call>{"name": "f", "arguments": {"a": }}</tool_call>',  # bad JSON
    '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>',  # unbalanced
    '<tool_call>["f", {"a": 1}]</tool_call>',  # not an object
    '<tool_call>{"arguments": {"a": 1}}</tool_call>',  # no name
    '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "f", "arguments": {"a": 1',  # cut mid-way (e.g. by max_tokens)
    'Sure: <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call',  # cut inside the end tag
]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_parse(text, content, calls):
    assert parse(text) == (content, calls)


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_is_content(text):
    """As vLLM's hermes parser: the output comes back as content, nothing is lost."""
    assert parse(text) == (text, [])


def test_malformed_block_beside_a_valid_one():
    """Each block is judged on its own (vLLM drops every call when one block is bad)."""
    bad = '<tool_call>{"name": oops}</tool_call>'
    assert parse(WEATHER_CALL + bad) == (bad, [("get_weather", WEATHER_ARGS)])


def test_max_calls():
    """``parallel_tool_calls: false``: the first call only."""
    assert parse(WEATHER_CALL + TIME_CALL, max_calls=1) == (None, [("get_weather", WEATHER_ARGS)])


def test_call_json_shape():
    call = HermesToolParser().parse(WEATHER_CALL).tool_calls[0]
    assert call.id.startswith("call_") and len(call.id) == 29
    assert call.to_json() == {"id": call.id, "type": "function",
                              "function": {"name": "get_weather", "arguments": WEATHER_ARGS}}
    assert json.loads(call.arguments) == {"city": "Zürich", "unit": "celsius"}


def accumulate(deltas: list[dict[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """What a client builds from streamed deltas (OpenAI's rules: name and arguments concatenate)."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            c["id"] += tc.get("id", "")
            c["name"] += tc.get("function", {}).get("name", "")
            c["arguments"] += tc.get("function", {}).get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


def streamed(pieces: list[str]) -> tuple[list[dict[str, Any]], tuple[str, list[dict[str, str]]]]:
    s = HermesToolParser(new_id=ids()).stream()
    deltas = [d for p in pieces for d in s.feed(p)] + s.finish()
    return deltas, accumulate(deltas)


def expected(text: str) -> tuple[str, list[dict[str, str]]]:
    msg = HermesToolParser(new_id=ids()).parse(text)
    return msg.content or "", [{"id": t.id, "name": t.name, "arguments": t.arguments} for t in msg.tool_calls]


@pytest.mark.parametrize("text", [c[0] for c in CASES] + MALFORMED)
def test_streaming_at_every_split(text):
    """Split once at every boundary, twice at every pair, and one character at a time: the deltas
    always add up to the complete parse; no tag leaks into content where the block was a call."""
    want = expected(text)
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    splits += [[text[:i], text[i:j], text[j:]] for i in range(0, len(text) + 1, 3) for j in range(i, len(text) + 1, 5)]
    splits.append(list(text))
    for pieces in splits:
        deltas, got = streamed(pieces)
        assert got == want, pieces
        if parse(text)[1]:  # calls: their tags never reach the client as text
            assert not any("<tool_call" in d.get("content", "") for d in deltas), pieces


def test_streaming_delta_shape():
    """First the call's id, type and name (arguments ""), then its arguments; indices count calls."""
    deltas, _ = streamed(["Hi ", WEATHER_CALL[:30], WEATHER_CALL[30:] + TIME_CALL])
    assert deltas == [
        {"content": "Hi "},
        {"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": WEATHER_ARGS}}]},
        {"tool_calls": [{"index": 1, "id": "call_1", "type": "function",
                         "function": {"name": "get_time", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"tz": "Asia/Tokyo"}'}}]}]


def test_streaming_holds_back_only_what_may_be_a_tag():
    s = HermesToolParser().stream()
    assert s.feed("Hello <") == [{"content": "Hello "}]
    assert s.feed("b> and <tool") == [{"content": "<b> and "}]
    assert s.feed("box") == [{"content": "<toolbox"}]
    assert s.feed("<tool_call>{\"name\": \"f\"") == []
    assert s.finish() == [{"content": '<tool_call>{"name": "f"'}]  # cut before the JSON closed: text


# ---- through the server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_server(llm, tmp_path_factory):
    """The session's engine behind a server started with a tool-capable template (Qwen2.5's, from a
    file) and --enable-auto-tool-choice --tool-call-parser hermes."""
    path = tmp_path_factory.mktemp("templates") / "qwen2.5.jinja"
    path.write_text(QWEN25)
    with running_server(llm.engine, chat_template=str(path), enable_auto_tool_choice=True,
                        tool_call_parser="hermes") as srv:
        yield srv


class Scripts(dict):
    """marker -> (text, tokens): the text a request whose prompt holds ``[marker]`` generates."""

    def __setitem__(self, marker: str, value: str | tuple[str, int]) -> None:
        super().__setitem__(f"[{marker}]", value if isinstance(value, tuple) else (value, MAX_TOKENS))


@pytest.fixture
def scripted(monkeypatch, llm):
    """``scripted[marker] = text`` (or ``(text, max_tokens)``): a request whose prompt holds ``[marker]``
    generates ``text`` instead of the model's words, revealed ``len(text) / max_tokens`` characters per
    generated token (so streams split it wherever the token boundaries fall), whole when it finishes,
    which then counts as a stop (EOS). Such requests run with ``ignore_eos`` and that ``max_tokens``, so
    the model neither stops early nor runs past the script."""
    eng = llm.engine
    real = eng.step
    scripts = Scripts()

    def step() -> list[Any]:
        outs = []
        for out in real():
            script = next((v for m, v in scripts.items() if m in (out.prompt or "")), None)
            if script is not None:
                text, tokens = script
                per_token = math.ceil(len(text) / tokens)
                new = [dataclasses.replace(c, text=text if c.finished else text[:per_token * len(c.token_ids)],
                                           finish_reason="stop" if c.finish_reason == "length" else c.finish_reason)
                       for c in out.outputs]
                out = dataclasses.replace(out, outputs=new)
            outs.append(out)
        return outs

    monkeypatch.setattr(eng, "step", step)
    return scripts


MAX_TOKENS = 12
USER = "What's the weather in Zürich?"


def chat(client: Any, marker: str, stream: bool = False, **kw: Any) -> Any:
    messages = kw.pop("messages", [{"role": "user", "content": f"{USER} [{marker}]"}])
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    return client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                          max_tokens=kw.pop("max_tokens", MAX_TOKENS), temperature=0,
                                          stream=stream, extra_body=extra, **kw)


def collect_stream(chunks: Any) -> dict[str, Any]:
    """The message a client builds from a chat stream (openai's chunk objects)."""
    content, calls, finish, deltas = "", {}, None, []
    for ch in chunks:
        for choice in ch.choices:
            d = choice.delta
            deltas.append(d)
            content += d.content or ""
            for tc in d.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                c["id"] += tc.id or ""
                c["name"] += (tc.function.name or "") if tc.function else ""
                c["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = choice.finish_reason or finish
    return {"content": content, "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": finish,
            "deltas": deltas}


def test_tool_calls_non_streaming(tool_server, scripted):
    client = tool_server.openai()
    scripted["s1"] = "Let me look that up.\n" + WEATHER_CALL + "\n" + TIME_CALL
    out = chat(client, "s1", tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look that up.\n\n"
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, c.function.arguments) for c in calls] == [
        ("function", "get_weather", WEATHER_ARGS), ("function", "get_time", '{"tz": "Asia/Tokyo"}')]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    scripted["s2"] = WEATHER_CALL
    only = chat(client, "s2", tools=TOOLS, tool_choice="auto").choices[0]
    assert only.message.content is None and only.message.tool_calls[0].function.name == "get_weather"
    first = chat(client, "s1", tools=TOOLS, parallel_tool_calls=False).choices[0]
    assert [c.function.name for c in first.message.tool_calls] == ["get_weather"]


def test_malformed_tool_call_is_content(tool_server, scripted):
    client = tool_server.openai()
    scripted["bad"] = MALFORMED[0]
    out = chat(client, "bad", tools=TOOLS).choices[0]
    assert out.message.content == MALFORMED[0] and not out.message.tool_calls
    assert out.finish_reason == "stop"
    streamed_msg = collect_stream(chat(client, "bad", stream=True, tools=TOOLS))
    assert streamed_msg["content"] == MALFORMED[0] and streamed_msg["tool_calls"] == []
    assert streamed_msg["finish_reason"] == "stop"


@pytest.mark.parametrize("max_tokens", [3, 12, 40])
def test_tool_calls_streaming_equals_non_streaming(tool_server, scripted, max_tokens):
    """The openai client's stream adds up to the non-streamed message; the pieces arrive split wherever
    the token boundaries fall; no <tool_call> text reaches a content delta."""
    client = tool_server.openai()
    scripted["st"] = ("Sure! " + WEATHER_CALL + "\n" + TIME_CALL + " Done.", max_tokens)
    full = chat(client, "st", tools=TOOLS, max_tokens=max_tokens).choices[0]
    s = collect_stream(chat(client, "st", stream=True, tools=TOOLS, max_tokens=max_tokens))
    assert s["finish_reason"] == full.finish_reason == "tool_calls"
    assert s["content"] == full.message.content == "Sure! \n Done."
    assert [(c["name"], c["arguments"]) for c in s["tool_calls"]] == [
        (c.function.name, c.function.arguments) for c in full.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in s["tool_calls"])
    assert not any("<tool" in (d.content or "") for d in s["deltas"])
    heads = [tc for d in s["deltas"] for tc in d.tool_calls or [] if tc.id]
    assert [(h.index, h.type, h.function.name) for h in heads] == [(0, "function", "get_weather"),
                                                                     (1, "function", "get_time")]


def test_streaming_raw_sse_and_n(tool_server, scripted):
    """Raw SSE: a tool call's first delta carries id, type and name, the next its arguments; with n=2
    each choice is parsed on its own; usage comes last."""
    scripted["raw"] = WEATHER_CALL
    body = {"messages": [{"role": "user", "content": "Hi [raw]"}], "tools": TOOLS, "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "temperature": 0, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with tool_server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    per_choice: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for e in events:
        for ch in e["choices"]:
            per_choice[ch["index"]].append(ch)
    for chs in per_choice.values():
        tool_deltas = [ch["delta"]["tool_calls"][0] for ch in chs if "tool_calls" in ch["delta"]]
        assert tool_deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
        assert tool_deltas[0]["type"] == "function" and tool_deltas[0]["id"].startswith("call_")
        assert tool_deltas[1] == {"index": 0, "function": {"arguments": WEATHER_ARGS}}
        assert chs[-1]["finish_reason"] == "tool_calls"
        assert not any(ch["delta"].get("content") for ch in chs[1:])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2 * MAX_TOKENS


def test_tools_reach_the_template(tool_server, llm):
    """prompt_tokens are those of the chat rendered with the tools (as transformers renders it), for
    tool_choice auto and none alike; /tokenize renders them too."""
    tok = llm.engine.tokenizer
    client = tool_server.openai()
    msgs = [{"role": "user", "content": USER}]
    hf = tok.apply_chat_template(msgs, True, QWEN25, tools=TOOLS)
    assert "<tools>" in hf and '"name": "get_time"' in hf
    plain = chat(client, "x", messages=msgs, max_tokens=1)
    assert plain.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(msgs, True, QWEN25), False))
    for choice in ("auto", "none"):
        out = chat(client, "x", messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=1)
        assert out.usage.prompt_tokens == len(tok.encode(hf, False)) > plain.usage.prompt_tokens
    with tool_server.client() as c:
        t = c.post("/tokenize", json={"messages": msgs, "tools": TOOLS}).json()
        assert t["tokens"] == tok.encode(hf, False)
        bad = c.post("/tokenize", json={"prompt": "x", "tools": TOOLS})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"


def test_tool_choice_none_does_not_parse(tool_server, scripted):
    scripted["none"] = WEATHER_CALL
    out = chat(tool_server.openai(), "none", tools=TOOLS, tool_choice="none").choices[0]
    assert out.message.content == WEATHER_CALL and not out.message.tool_calls and out.finish_reason == "stop"
    no_tools = chat(tool_server.openai(), "none").choices[0]  # no tools sent: no parsing either
    assert no_tools.message.content == WEATHER_CALL and not no_tools.message.tool_calls


def test_a_conversation_with_tool_results(tool_server, llm, scripted):
    """An OpenAI-format history (arguments as JSON strings, content null, tool results) renders as
    transformers renders the same history, and the next answer comes back."""
    tok = llm.engine.tokenizer
    scripted["tr"] = "It is 21 °C and clear in Zürich."
    call = {"id": "call_abc", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}
    msgs = [{"role": "user", "content": f"{USER} [tr]"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 21, "sky": "clear"}'}]
    out = chat(tool_server.openai(), "tr", messages=msgs, tools=TOOLS)
    assert out.choices[0].message.content == "It is 21 °C and clear in Zürich."
    assert out.choices[0].finish_reason == "stop"
    hf_msgs = [msgs[0], {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]}, msgs[2]]
    text = tok.apply_chat_template(hf_msgs, True, QWEN25, tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in text
    assert out.usage.prompt_tokens == len(tok.encode(text, False))


@pytest.mark.parametrize("body,param,needle", [
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "only 'function'"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name", "a-z"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools.0.function.name", "64"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]},
     "tools.0.function.parameters", "object"),
    ({"tools": [{"type": "function"}]}, "tools.0.function", "name"),
    ({"tools": "get_weather"}, "tools", "list"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "not one of the tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'none', 'auto', 'required'"),
    ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
    ({"functions": [{"name": "f"}]}, "functions", "use tools"),
    ({"function_call": "auto"}, "function_call", "use tool_choice"),
    ({"tools": TOOLS, "documents": [{"title": "a", "text": "b"}]}, "documents", "cannot render documents"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages.1.tool_calls", "not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0.tool_calls",
     "only assistant"),
])
def test_bad_tool_fields_are_400(tool_server, body, param, needle):
    with tool_server.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 1, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


@pytest.fixture
def plain_server(llm):
    """The model's own template (SmolLM2's, which has no tools) and no tool flags."""
    with running_server(llm.engine) as srv:
        yield srv


def test_without_the_flags_and_without_a_tool_template(plain_server, llm):
    client = plain_server.openai()
    with pytest.raises(openai.BadRequestError) as e:  # tools imply tool_choice "auto" (vLLM)
        chat(client, "x", tools=TOOLS)
    assert e.value.body["param"] == "tool_choice" and "--enable-auto-tool-choice" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "x", tools=TOOLS, tool_choice="none")  # rendered: but this template cannot
    assert e.value.body["param"] == "tools" and "cannot render tools" in e.value.body["message"]
    ok = chat(client, "x", tools=[], tool_choice="none", max_tokens=1)  # no tools at all: fine
    assert ok.usage.prompt_tokens > 0


def test_exclude_tools_when_tool_choice_none(llm):
    with running_server(llm.engine, exclude_tools_when_tool_choice_none=True) as srv:
        out = chat(srv.openai(), "x", tools=TOOLS, tool_choice="none", max_tokens=1)  # not rendered: no 400
        tok = llm.engine.tokenizer
        msgs = [{"role": "user", "content": f"{USER} [x]"}]
        assert out.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(msgs), False))


# ---- flags ------------------------------------------------------------------------------------------
@pytest.fixture
def fake_run_server(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    import sarathi.server

    seen: dict[str, Any] = {}
    monkeypatch.setattr(sarathi.server, "run_server", lambda args, **kw: seen.update(kw, args=args) or 0)
    return seen


def test_serve_tool_flags(fake_run_server):
    assert main(["serve", "m.gguf", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                 "--exclude-tools-when-tool-choice-none"]) == 0
    assert fake_run_server["enable_auto_tool_choice"] is True
    assert fake_run_server["tool_call_parser"] == "hermes"
    assert fake_run_server["exclude_tools_when_tool_choice_none"] is True
    fake_run_server.clear()
    assert main(["serve", "m.gguf"]) == 0
    assert fake_run_server["enable_auto_tool_choice"] is False and fake_run_server["tool_call_parser"] is None


def test_bad_tool_flags_fail_before_the_model_loads(monkeypatch, capsys):
    import sarathi.engine
    import sarathi.llm  # noqa: F401

    monkeypatch.setattr(sarathi.engine, "LLMEngine", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["serve", "--enable-auto-tool-choice"]) == 2
    assert "needs --tool-call-parser" in capsys.readouterr().err
    assert main(["serve", "--enable-auto-tool-choice", "--tool-call-parser", "pythonic"]) == 2
    assert "unknown parser 'pythonic'; available: hermes" in capsys.readouterr().err


def test_build_app_checks_tool_flags(llm):
    from sarathi.errors import InvalidArgument
    from sarathi.server import build_app

    with pytest.raises(InvalidArgument) as e:
        build_app(llm.engine, enable_auto_tool_choice=True)
    assert e.value.field == "enable_auto_tool_choice"
    with pytest.raises(InvalidArgument) as e:
        build_app(llm.engine, tool_call_parser="nope")
    assert e.value.field == "tool_call_parser"


def test_tool_call_dataclass_default_id():
    assert ToolCall("f", "{}").id.startswith("call_")
