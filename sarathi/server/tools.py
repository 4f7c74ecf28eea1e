"""Tools on ``/v1/chat/completions``: checking ``tools`` / ``tool_choice`` / the ``tool_calls`` of messages,
and the server's tool options (``--enable-auto-tool-choice``, ``--tool-call-parser``,
``--exclude-tools-when-tool-choice-none``), with vLLM's rules:

- ``tools`` present and ``tool_choice`` absent means ``"auto"``; ``"auto"`` needs the server started with
  ``--enable-auto-tool-choice --tool-call-parser NAME`` (else 400), and the output is parsed for calls;
- ``"none"``: the tools are still rendered into the prompt (unless ``--exclude-tools-when-tool-choice-none``)
  and nothing is parsed;
- ``"required"`` and a named function force a call through structured outputs
  (``sarathi.server.forced_tools``); they need no server flags, only a template that renders tools;
- a ``tool_choice`` other than ``"none"`` without tools is a 400 (``"required"`` with ``tools: []`` is
  ``"none"``, as in vLLM and OpenAI).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from sarathi.errors import InvalidArgument
from sarathi.sampling_params import StructuredOutputsParams
from sarathi.server.forced_tools import NamedToolParser, RequiredToolParser, forced_constraint
from sarathi.server.tool_parsers import TOOL_PARSERS, ToolParser

logger = logging.getLogger("sarathi.server")

FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _bad(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(field, f"{field}: {message}")


def check_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """The request's ``tools`` as the chat template gets them (as sent), after checking each is
    ``{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}`` (an empty
    list is rendered as such, as vLLM does). Raises InvalidArgument naming ``tools.N...``."""
    if tools is None:
        return None
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise _bad(where, "must be an object {'type': 'function', 'function': {...}}")
        if tool.get("type", "function") != "function":  # vLLM defaults a missing type to "function"
            raise _bad(f"{where}.type", f"only 'function' tools are supported, got {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{where}.function", "must be an object with a 'name'")
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise _bad(f"{where}.function.name", f"must be 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-', "
                                                 f"got {name!r}")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise _bad(f"{where}.function.description", "must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _bad(f"{where}.function.parameters", "must be a JSON Schema object")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise _bad(f"{where}.function.strict", "must be a boolean")
    return tools


def resolve_tool_choice(tool_choice: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any] | None:
    """``"none"``, ``"auto"``, ``"required"``, the named-function object, or None (no tools at all).
    Raises InvalidArgument("tool_choice") for a value that is not one of these or does not fit ``tools``."""
    if tool_choice is None:
        return "auto" if tools else None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise _bad("tool_choice", f"must be 'none', 'auto', 'required' or {{'type': 'function', "
                                      f"'function': {{'name': ...}}}}, got {tool_choice!r}")
        if tool_choice == "none":
            return "none"
        if not tools:
            if tool_choice == "required":
                return "none"  # nothing can be required of no tools (vLLM, OpenAI)
            raise _bad("tool_choice", "'auto' needs tools; send 'tools' too")
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (not isinstance(tool_choice, dict) or tool_choice.get("type", "function") != "function"
            or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)):
        raise _bad("tool_choice", "a named function is {'type': 'function', 'function': {'name': ...}}")
    if not tools:
        raise _bad("tool_choice", "a named function needs tools; send 'tools' too")
    if fn["name"] not in {t["function"]["name"] for t in tools}:
        raise _bad("tool_choice.function.name", f"{fn['name']!r} is not one of the tools")
    return tool_choice


def check_tool_calls(value: Any) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` (OpenAI's form) for the chat template: each function's
    ``arguments`` JSON string parsed to its object, as vLLM passes them (templates write them with
    ``tojson``). Raises ValueError (the message's field is added by pydantic)."""
    if not isinstance(value, list):
        raise ValueError("must be a list of {'id', 'type': 'function', 'function': {'name', 'arguments'}}")
    out = []
    for i, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"call {i} must be {{'id', 'type': 'function', 'function': "
                             "{'name', 'arguments'}}")
        if call.get("type", "function") != "function":
            raise ValueError(f"call {i}: only 'function' tool calls are supported")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise ValueError(f"call {i}: 'id' must be a string")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise ValueError(f"call {i}: function.arguments is not valid JSON") from None
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


@dataclass
class ToolOptions:
    """The server's tool flags (vLLM's names). ``parser()`` is the ``--tool-call-parser`` for requests
    with ``tool_choice: "auto"``; None when ``--enable-auto-tool-choice`` is off."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False

    def check(self) -> ToolOptions:
        """Raise InvalidArgument for flags that cannot work together (at start-up)."""
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise _bad("tool_call_parser", f"unknown parser {self.tool_call_parser!r}; available: "
                                           f"{', '.join(sorted(TOOL_PARSERS))}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise _bad("enable_auto_tool_choice", "needs --tool-call-parser (e.g. hermes)")
        if self.tool_call_parser is not None and not self.enable_auto_tool_choice:
            logger.warning("--tool-call-parser %s has no effect without --enable-auto-tool-choice",
                           self.tool_call_parser)
        return self

    def parser(self, parallel_tool_calls: bool = True) -> ToolParser | None:
        if not self.enable_auto_tool_choice or self.tool_call_parser is None:
            return None
        return TOOL_PARSERS[self.tool_call_parser](max_calls=None if parallel_tool_calls else 1)

    def for_request(self, req: Any) -> tuple[ToolParser | None, bool, StructuredOutputsParams | None]:
        """For a chat request (``tools``, ``tool_choice``, ``parallel_tool_calls``, ...): the parser of
        its output's tool calls or None, whether its tools go into the prompt, and the constraint that
        forces a call or None. Raises InvalidArgument for what cannot be served."""
        for old, new in (("functions", "tools"), ("function_call", "tool_choice")):
            if getattr(req, old) is not None:
                raise _bad(old, f"deprecated by OpenAI and not supported; use {new}")
        tools = check_tools(req.tools)
        choice = resolve_tool_choice(req.tool_choice, tools)
        if choice == "required" or isinstance(choice, dict):
            assert tools  # resolve_tool_choice turned "required" without tools into "none"
            constraint = forced_constraint(choice, tools, req.parallel_tool_calls)
            if isinstance(choice, dict):
                return NamedToolParser(choice["function"]["name"]), True, constraint
            return RequiredToolParser(max_calls=None if req.parallel_tool_calls else 1), True, constraint
        if choice == "auto":
            parser = self.parser(req.parallel_tool_calls)
            if parser is None:
                raise _bad("tool_choice", '"auto" (the default when tools are sent) requires the server '
                                          "to be started with --enable-auto-tool-choice and "
                                          "--tool-call-parser")
            return parser, True, None
        return None, not (choice == "none" and self.exclude_tools_when_tool_choice_none), None
