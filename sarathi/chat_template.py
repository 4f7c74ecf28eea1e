"""Rendering chat templates exactly as HF transformers' ``apply_chat_template`` does, without importing it.

Same jinja sandbox (``ImmutableSandboxedEnvironment``, ``trim_blocks``, ``lstrip_blocks``), same extensions
(``loopcontrols`` and the ``{% generation %}`` tag, which renders its body), same filters and globals
(``tojson`` with ``ensure_ascii``/``indent``/``separators``/``sort_keys``, ``raise_exception``,
``strftime_now``, ``dict``, a ``namespace`` that refuses underscore names) and the same template
variables: ``messages`` (keys whose value is None dropped; ``reasoning_content`` / ``thinking`` /
``reasoning`` aliased to each other), ``tools``, ``documents``, ``add_generation_prompt``, the special
tokens that exist (``bos_token``, ``eos_token``, ...) and any extra keyword. Everything the template sees
is rebuilt from plain JSON types first. ``continue_final_message`` cuts the rendered chat after the final
message with transformers' tag method. Checked against transformers in tests/test_chat_templates.py.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sarathi.errors import InvalidArgument

# The names transformers passes a message's reasoning under; the first is the one templates read.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class TemplateRaised(TemplateError):
    """``raise_exception(message)`` called by the template: the template refused its input."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Not jinja's own tojson, which HTML-escapes <, >, & and ' and takes fewer options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` in templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's ``namespace`` refusing underscore-prefixed attributes (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's signature: namespace(self=...))
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace, "
                                f"got {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's tokens for training masks in
    transformers; for rendering it is its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached: the server renders the same one on every request). Raises jinja2's
    TemplateSyntaxError for a template that does not parse."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


@lru_cache(maxsize=32)
def template_variables(source: str) -> frozenset[str]:
    """The variables ``source`` reads from its context (e.g. whether it renders ``tools`` at all)."""
    env = compile_template(source).environment
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))


def plain_data(value: Any) -> Any:
    """``value`` rebuilt from plain JSON types (str, int, float, bool, None, dict, list, tuple), as
    transformers does before a template sees it: subclasses are stripped to their base type, anything
    else becomes a ``"<TypeName>"`` placeholder (so no object with unsafe methods reaches the sandbox)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize(messages: list[Any]) -> list[dict[str, Any]]:
    """Keys whose value is None dropped (templates test for a missing key, not for None), reasoning
    fields aliased to each other."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgument("messages", f"messages.{i}: must be an object, got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render(source: str, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
           documents: list[dict[str, Any]] | None = None, add_generation_prompt: bool = False,
           continue_final_message: bool = False, special_tokens: dict[str, str] | None = None,
           **kwargs: Any) -> str:
    """``transformers``' ``tokenizer.apply_chat_template(messages, tools=..., documents=...,
    chat_template=source, add_generation_prompt=..., continue_final_message=..., tokenize=False,
    **kwargs)`` for a tokenizer whose special tokens map is ``special_tokens``; keyword arguments win
    over special tokens. Raises jinja2's TemplateError (``TemplateRaised`` for ``raise_exception``) and
    InvalidArgument("messages") for inputs transformers refuses."""
    if not messages:
        raise InvalidArgument("messages", "messages: cannot render an empty conversation")
    if continue_final_message and add_generation_prompt:
        raise InvalidArgument("continue_final_message", "continue_final_message: cannot be used with "
                                                        "add_generation_prompt")
    template = compile_template(source)
    chat = plain_data(_normalize(messages))
    if documents is not None and any(not isinstance(d, dict) for d in documents):
        raise InvalidArgument("documents", "documents: each document must be an object")
    final = None
    if continue_final_message:
        final = chat[-1].get("content")
        if final is None:
            raise InvalidArgument("messages", "messages: continue_final_message: the final message has no "
                                              "content to continue")
        if "content" not in source:
            raise InvalidArgument("messages", "messages: continue_final_message: the chat template does not "
                                              "read the message content")
        if isinstance(final, (list, tuple)):
            for part in reversed(final):
                if isinstance(part, dict) and "text" in part:
                    final, part["text"] = part["text"], part["text"] + _CONTINUE_TAG
                    break
            else:
                raise InvalidArgument("messages", "messages: continue_final_message: the final message has "
                                                  "no text to continue")
        else:
            chat[-1]["content"] = final + _CONTINUE_TAG
    variables = {**(special_tokens or {}), **plain_data(kwargs)}
    text = template.render(messages=chat, tools=plain_data(tools), documents=plain_data(documents),
                           add_generation_prompt=add_generation_prompt, **variables)
    if final is None:
        return text
    if str(final).strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise InvalidArgument("messages", "messages: continue_final_message: the text of the final message "
                                          "does not appear in the rendered chat, so it cannot be continued")
    loc = text.rindex(_CONTINUE_TAG.strip())
    if text[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:  # the template kept the message as it was
        return text[:loc]
    return text[:loc].rstrip()  # the template trimmed trailing whitespace
