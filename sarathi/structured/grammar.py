"""Turning a structured-output spec into an xgrammar ``Grammar`` (no tokenizer needed): validation.

Kinds, as vLLM's ``StructuredOutputsParams`` names them: ``json`` (a JSON schema), ``json_object`` (any
JSON object, OpenAI's ``response_format: json_object``), ``regex``, ``choice`` (one of a list of
strings) and ``grammar`` (xgrammar's EBNF, GBNF-like: ``root ::= ...``).
"""

from __future__ import annotations

import json
import re
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")
JSON_OBJECT_SCHEMA = '{"type": "object"}'
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def parse(kind: str, spec: Any, any_whitespace: bool = True) -> Any:
    """The xgrammar ``Grammar`` of ``spec`` (canonical form, see ``sampling_params``). Raises
    ``ValueError`` with xgrammar's reason (without its log prefix) if it is not valid."""
    import xgrammar as xgr

    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(spec, any_whitespace=any_whitespace)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=any_whitespace)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(spec))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(spec)
    except (RuntimeError, ValueError, MemoryError, RecursionError, TypeError) as e:
        raise ValueError(describe(e)) from None
    raise ValueError(f"unknown structured output kind {kind!r}")


def describe(e: BaseException) -> str:
    """xgrammar's error message, first line, without its C++ log prefix."""
    if isinstance(e, MemoryError | RecursionError):
        return "too deeply nested"
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return _LOG_PREFIX.sub("", lines[0]).strip() if lines else type(e).__name__


def choice_ebnf(choices: list[str]) -> str:
    """``root ::= "a" | "b" | ...`` with each choice as an EBNF string literal."""
    return "root ::= " + " | ".join(_literal(c) for c in choices)


def _literal(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def canonical_json(schema: Any) -> str:
    """A schema (dict, bool or JSON text) as compact JSON text: the cache key and what xgrammar parses.
    Key order is kept (properties are generated in the schema's order). Raises ValueError if it is not a
    JSON object or boolean."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(schema, dict | bool):
        raise ValueError(f"a JSON schema must be an object (or a boolean), got {type(schema).__name__}")
    try:
        return json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not serialisable as JSON: {e}") from None
