"""The structured-output fields of the OpenAI-compatible API, and their translation to
``StructuredOutputsParams``.

Accepted on completions and chat, one at a time (two of them together are a 400 naming the second):
- OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any
  JSON object), ``{"type": "json_schema", "json_schema": {"name", "description", "schema", "strict"}}``
  (a schema; without ``schema``, any JSON object; schemas are always strict);
- vLLM's ``structured_outputs`` object (``json``, ``json_object``, ``regex``, ``choice``, ``grammar``,
  ``disable_any_whitespace``, ...), and its older ``guided_json``, ``guided_regex``, ``guided_choice``,
  ``guided_grammar``; ``guided_decoding_backend`` may name ``xgrammar`` (or ``auto``), the only backend;
  ``guided_whitespace_pattern`` is refused.
A bad schema, regex or grammar is an ``InvalidArgument`` naming the field the client sent.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sarathi.errors import InvalidArgument
from sarathi.sampling_params import StructuredOutputsParams

_STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
BACKENDS = ("xgrammar", "auto")


class JsonSchemaFormat(BaseModel):
    model_config = _STRICT
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # schemas are always enforced strictly


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsFields(BaseModel):
    """vLLM's ``structured_outputs`` request object (the fields of ``StructuredOutputsParams``)."""

    model_config = _STRICT
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


class StructuredOutputRequestFields(BaseModel):
    """The request fields (a mixin of the completions and chat request models)."""

    model_config = _STRICT
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsFields | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    def structured_params(self) -> StructuredOutputsParams | None:
        """The request's constraint, or None. Raises ``InvalidArgument`` naming the client's field."""
        if self.guided_decoding_backend is not None and self.guided_decoding_backend not in BACKENDS:
            raise InvalidArgument("guided_decoding_backend",
                                  f"guided_decoding_backend: {self.guided_decoding_backend!r} is not "
                                  f"available; the backend is xgrammar ({' or '.join(map(repr, BACKENDS))})")
        if self.guided_whitespace_pattern is not None:
            raise InvalidArgument("guided_whitespace_pattern",
                                  "guided_whitespace_pattern: not supported (xgrammar backend); use "
                                  "structured_outputs.disable_any_whitespace")
        # (client field, the StructuredOutputsParams kwargs, how construction errors' fields map)
        given: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        rf = self.response_format
        if rf is not None and rf.type != "text":
            schema = rf.json_schema.schema_ if rf.type == "json_schema" and rf.json_schema else None
            if rf.type == "json_schema" and rf.json_schema is None:
                raise InvalidArgument("response_format.json_schema",
                                      "response_format.json_schema: required when type is 'json_schema'")
            kw: dict[str, Any] = {"json_object": True} if schema is None else {"json": schema}
            given.append(("response_format", kw,
                          {"structured_outputs.json": "response_format.json_schema.schema"}))
        if self.structured_outputs is not None:
            so = self.structured_outputs.model_dump()
            so["json"] = so.pop("json_")
            given.append(("structured_outputs", so, {}))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                given.append((name, {kind: value}, {f"structured_outputs.{kind}": name}))
        if not given:
            return None
        if len(given) > 1:
            first, second = given[0][0], given[1][0]
            raise InvalidArgument(second, f"{second}: cannot be combined with {first} (give one "
                                          "structured-output constraint)")
        name, kw, fields = given[0]
        try:
            params = StructuredOutputsParams(**kw)
        except InvalidArgument as e:
            new = fields.get(e.field, e.field)
            raise InvalidArgument(new, new + str(e).removeprefix(e.field)) from None
        params.field_name = name
        return params
