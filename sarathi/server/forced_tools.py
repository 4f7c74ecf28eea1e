"""Forced tool calls: ``tool_choice: "required"`` and a named function, built on structured outputs.

The output is constrained by a JSON schema (xgrammar, as any ``structured_outputs.json``), so the model
can only write a call; the parsers below turn that text into ``tool_calls``. vLLM's formats:

- a named function: the output is the function's ``arguments`` object itself (the schema is the
  function's ``parameters``); the message has that one call and ``finish_reason`` stays ``"stop"``, as
  OpenAI answers a forced function.
- ``"required"``: the output is a JSON array of ``{"name": ..., "parameters": {...}}``, at least one
  item (exactly one with ``parallel_tool_calls: false``), each item one of the tools; a choice that
  stopped on its own finishes with ``"tool_calls"``.

A forced choice has no ``content`` (None), except text that is not part of a call, which only an
output cut by ``max_tokens`` leaves: it is returned as ``content`` rather than dropped.
Streaming: a named call's header delta comes first and its arguments stream as they are generated; a
``"required"`` call is sent (header, then arguments) as soon as its array item is complete.
"""

from __future__ import annotations

import json
from typing import Any

from sarathi.errors import InvalidArgument
from sarathi.sampling_params import StructuredOutputsParams
from sarathi.server.tool_parsers import StreamingToolParser, ToolCall, ToolParser

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or ANY_OBJECT


def forced_constraint(choice: str | dict[str, Any], tools: list[dict[str, Any]],
                      parallel_tool_calls: bool) -> StructuredOutputsParams:
    """The JSON-schema constraint that forces ``choice`` (``"required"`` or a named function; tools
    already checked by ``sarathi.server.tools``). A parameters schema xgrammar cannot compile is an
    InvalidArgument naming ``tools.N.function.parameters``."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        index = next(i for i, t in enumerate(tools) if t["function"]["name"] == name)
        return _constraint(_parameters(tools[index]), f"tools.{index}.function.parameters")
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                             "parameters": _parameters(t)},
              "required": ["name", "parameters"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    try:
        return _constraint(schema, "tools")
    except InvalidArgument:  # name the tool whose parameters do not compile, not the whole array
        for i, t in enumerate(tools):
            _constraint(_parameters(t), f"tools.{i}.function.parameters")
        raise


def _constraint(schema: dict[str, Any], field: str) -> StructuredOutputsParams:
    try:
        params = StructuredOutputsParams(json=schema)
    except InvalidArgument as e:
        raise InvalidArgument(field, field + str(e).removeprefix(e.field)) from None
    params.field_name = "tool_choice"
    return params


class _NamedStream(StreamingToolParser):
    def __init__(self, parser: NamedToolParser) -> None:
        super().__init__()
        self.parser = parser

    def _header(self, out: list[dict[str, Any]]) -> ToolCall:
        if not self.tool_calls:
            tc = ToolCall(self.parser.function, "", self.parser.new_id())
            self.tool_calls.append(tc)
            out.append({"tool_calls": [{"index": 0, "id": tc.id, "type": "function",
                                        "function": {"name": tc.name, "arguments": ""}}]})
        return self.tool_calls[0]

    def feed(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if text:
            tc = self._header(out)
            tc.arguments += text
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        return out

    def finish(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        self._header(out)  # an empty output (max_tokens 0 or EOS at once) is still the forced call
        return out


class NamedToolParser(ToolParser):
    """``tool_choice`` naming a function: the whole output is that function's arguments."""

    name = "named"

    def __init__(self, function: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.function = function

    def stream(self) -> StreamingToolParser:
        return _NamedStream(self)

    def finish_reason(self, reason: str | None) -> str | None:
        return reason  # OpenAI answers a forced function with "stop"


class _RequiredStream(StreamingToolParser):
    def __init__(self, parser: RequiredToolParser) -> None:
        super().__init__()
        self.parser = parser
        self.buf = ""
        self.pos = 0  # where the next array item (or ',' / ']') may start
        self.opened = self.closed = False
        self.decoder = json.JSONDecoder()

    def _skip(self, chars: str) -> None:
        while self.pos < len(self.buf) and self.buf[self.pos] in chars:
            self.pos += 1

    def feed(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        self.buf += text
        while not self.closed:
            self._skip(" \t\r\n")
            if self.pos >= len(self.buf):
                break
            if not self.opened:
                if self.buf[self.pos] != "[":
                    break  # not a call array: left to finish() as content
                self.opened, self.pos = True, self.pos + 1
                continue
            if self.buf[self.pos] in ",]":
                self.closed = self.buf[self.pos] == "]"
                self.pos += 1
                continue
            try:
                item, end = self.decoder.raw_decode(self.buf, self.pos)
            except (ValueError, RecursionError):
                break  # an item still being written (or one that never parses: finish() keeps it)
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
                break
            self.pos = end
            self._call(self.parser, item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False),
                       out)
        return out

    def finish(self) -> list[dict[str, Any]]:
        out = self.feed("")
        # What a cut-off output left is returned, not dropped: all of it when no call was complete.
        rest = self.buf[self.pos:] if self.tool_calls else self.buf
        if rest.strip() or (rest and not self.tool_calls):
            out.append({"content": rest})
        self.buf, self.pos = "", 0
        return out


class RequiredToolParser(ToolParser):
    """``tool_choice: "required"``: the output is a JSON array of ``{"name", "parameters"}`` calls."""

    name = "required"

    def stream(self) -> StreamingToolParser:
        return _RequiredStream(self)
