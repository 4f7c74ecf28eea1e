"""Request bodies of the OpenAI-compatible API (pydantic), and helpers that shape the JSON we send back.

Requests are validated strictly (a string where a number belongs is a 400, not a silent coercion);
unknown fields are ignored so that clients sending newer OpenAI fields keep working. Range checks
live in ``SamplingParams`` and in the engine, whose error messages start with the field name.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from sarathi.errors import InvalidArgument
from sarathi.outputs import CompletionOutput, Logprob, PromptLogprobs
from sarathi.sampling_params import SamplingParams
from sarathi.structured.requests import StructuredOutputRequestFields

_STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

# OpenAI's chat roles. Anything else is refused rather than pasted into the chat template, where a role
# such as "user<|im_end|>..." would forge turns.
Role = Literal["system", "user", "assistant", "tool", "developer"]
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for legacy completions


def check_unicode(text: str, where: str = "") -> str:
    """``text`` if it can be encoded as UTF-8; JSON's ``\\ud800`` escapes can smuggle in lone UTF-16
    surrogates, which no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}contains a lone UTF-16 surrogate at character {e.start}; "
                         "send valid Unicode") from None
    return text


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ModelNamed(BaseModel):
    """A request body with an optional ``model`` name (valid Unicode, checked against what we serve)."""

    model_config = _STRICT
    model: str | None = None

    @field_validator("model")
    @classmethod
    def _valid_model_name(cls, v: str | None) -> str | None:
        return v if v is None else check_unicode(v)


# What temperature, top_p, top_k, min_p and repetition_penalty mean when a request leaves them out (or
# sends null) and the server has no --generation-config default for them.
SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
                                     "repetition_penalty": 1.0}


class _SamplingFields(ModelNamed, StructuredOutputRequestFields):
    """Fields shared by both endpoints: OpenAI's names plus vLLM's extras.

    Invariant: a field of ``SAMPLING_DEFAULTS`` (and ``max_tokens``) is None exactly when the client did
    not set it; the server's defaults (``--generation-config``) then apply, and a client's value wins."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=64)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's: logprobs of the prompt tokens
    # vLLM fields sarathi does not implement yet: declared so that a non-default value is a 400 naming
    # it instead of being dropped by ``extra="ignore"`` (their defaults are accepted: clients send them).
    allowed_token_ids: Any = None
    bad_words: Any = None
    use_beam_search: Any = False
    length_penalty: Any = 1.0
    truncate_prompt_tokens: Any = None

    def check_unsupported(self) -> None:
        for name, default in (("allowed_token_ids", None), ("bad_words", None), ("use_beam_search", False),
                              ("length_penalty", 1.0), ("truncate_prompt_tokens", None)):
            v = getattr(self, name)
            if v != default and not (default is None and v == []):
                raise InvalidArgument(name, f"{name}: not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("stream_options", "stream_options: only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidArgument("prompt_logprobs", "prompt_logprobs: not available when stream is true "
                                                     "(as in vLLM)")

    def logprob_params(self) -> dict[str, Any]:
        """The SamplingParams fields about prompt logprobs and best_of."""
        return {"prompt_logprobs": self.prompt_logprobs}

    @property
    def requested_max_tokens(self) -> int | None:
        """The client's max_tokens; None when it sent none (the server picks the default)."""
        return self.max_tokens

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """Build SamplingParams (raises ValueError naming the field). ``defaults`` (the server's
        generation config) fill the fields of ``SAMPLING_DEFAULTS`` the request left unset."""
        self.check_unsupported()
        base = {**SAMPLING_DEFAULTS, **{k: v for k, v in (defaults or {}).items() if k in SAMPLING_DEFAULTS}}
        own = {k: getattr(self, k) for k in SAMPLING_DEFAULTS}
        chosen = {k: base[k] if v is None else v for k, v in own.items()}
        return SamplingParams(
            n=self.n, seed=self.seed, **chosen,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=self._logit_bias(), **self.logprob_params(),
            structured_outputs=self.structured_params(),  # response_format, guided_*: sarathi.structured
        )

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI sends token ids as JSON object keys (strings)."""
        if not self.logit_bias:
            return None
        out = {}
        for k, v in self.logit_bias.items():
            if not k.isascii() or not k.isdigit() or len(k) > 12:
                raise InvalidArgument("logit_bias", f"logit_bias: keys must be token ids, got {k!r}")
            out[int(k)] = v
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=64)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)

        if isinstance(v, str):
            return check_unicode(v)
        if is_ids(v):
            return v
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            for i, p in enumerate(v):
                check_unicode(p, f"element {i} ")
            return v
        if isinstance(v, list) and v and all(is_ids(p) for p in v):
            return v
        raise ValueError("must be a string, a list of strings, a non-empty list of token ids, "
                         "or a list of such lists")

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise InvalidArgument("suffix", "suffix: not supported")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise InvalidArgument("best_of", "best_of: must equal n when stream is true (as in vLLM): the "
                                             "best sequences are known only at the end")

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens: 0``: the prompt (and its logprobs) and nothing generated. The
        engine still samples one token, which is dropped (and not counted in usage)."""
        return self.echo and self.max_tokens == 0

    @property
    def requested_max_tokens(self) -> int | None:
        return 1 if self.echo_only else self.max_tokens

    def logprob_params(self) -> dict[str, Any]:
        """``echo`` with ``logprobs`` needs the prompt tokens' logprobs (with as many alternatives)."""
        plp = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            plp = max(plp or 0, self.logprobs)
        return {"prompt_logprobs": plp, "best_of": self.best_of}


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Role
    content: Any = ""
    name: str | None = None
    tool_call_id: str | None = Field(None, validate_default=True)
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls (sarathi.server.tools)

    @field_validator("content", mode="before")
    @classmethod
    def _flatten(cls, v: Any) -> str:
        """Accept a string, null, or a list of {"type": "text", "text": ...} parts."""
        if v is None or isinstance(v, str):
            return check_unicode(v or "")
        if isinstance(v, list) and all(isinstance(p, dict) for p in v):
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in v):
                raise ValueError("only text content parts are supported")
            return check_unicode("".join(p["text"] for p in v))
        raise ValueError("must be a string or a list of text parts")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        return v if v is None else check_unicode(v)

    @field_validator("tool_call_id")
    @classmethod
    def _check_tool_call_id(cls, v: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not v:
            raise ValueError("required for messages with role 'tool'")
        return v if v is None else check_unicode(v)

    @field_validator("tool_calls")
    @classmethod
    def _check_tool_calls(cls, v: list[dict[str, Any]] | None, info: ValidationInfo
                          ) -> list[dict[str, Any]] | None:
        from sarathi.server.tools import check_tool_calls

        if v is None:
            return None
        if info.data.get("role") != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        check_unicode(json.dumps(v, ensure_ascii=False))
        return check_tool_calls(v)

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template sees it. Templates written before OpenAI's "developer" role
        know only "system", which is what "developer" means."""
        msg = self.model_dump(exclude_none=True)
        if self.role == "developer":
            msg["role"] = "system"
        return msg


class ChatTemplateFields(BaseModel):
    """vLLM's fields that shape how ``messages`` are rendered with the chat template (also accepted by
    ``/tokenize``). ``chat_template_kwargs`` are extra template variables (e.g. ``enable_thinking``);
    ``continue_final_message`` leaves the last message open for the model to continue (it implies
    ``add_generation_prompt: false`` unless that is sent as true, which is a 400). A per-request
    ``chat_template`` is refused (the server's ``--chat-template`` sets it)."""

    model_config = _STRICT
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None
    # Rendered by the chat template as its `tools` / `documents` (checked by sarathi.server.tools).
    tools: list[Any] | None = None
    documents: list[dict[str, Any]] | None = None

    @field_validator("chat_template_kwargs", "tools", "documents")
    @classmethod
    def _kwargs_unicode(cls, v: Any) -> Any:
        if v is not None:
            check_unicode(json.dumps(v, ensure_ascii=False))
        return v


class ChatCompletionRequest(_SamplingFields, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # tools (with ChatTemplateFields.tools); checked and resolved by sarathi.server.tools
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    functions: Any = None  # OpenAI's deprecated names for tools / tool_choice: refused, not ignored
    function_call: Any = None
    echo: Any = False  # vLLM's chat echo (prepend the last message): not implemented, refused when set

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo not in (False, None):
            raise InvalidArgument("echo", "echo: not supported for chat completions by this server")

    def conversation(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    @property
    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs", "top_logprobs: requires logprobs to be true")
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- errors -------------------------------------------------------------------------------------
def describe_validation_error(e: ValidationError) -> tuple[str, str]:
    """(param, message) for the first problem pydantic found."""
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or "body"
    msg = err["msg"].removeprefix("Value error, ")
    return param, f"{param}: {msg}"


def error_body(message: str, err_type: str, param: str | None, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


# ---- response pieces ----------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens`` (prompt tokens whose K/V came from the
    prefix cache) only when some did, as OpenAI omits it for uncached prompts."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def envelope(resp_id: str, obj: str, model: str, created: int | None = None) -> dict[str, Any]:
    return {"id": resp_id, "object": obj, "created": created or int(time.time()), "model": model}


def _top(entry: dict[int, Logprob], k: int) -> list[Logprob]:
    return sorted((lp for lp in entry.values() if lp.rank <= k), key=lambda lp: lp.rank)


def completion_logprobs(c: CompletionOutput, start: int, k: int, text_offset: int) -> dict[str, Any]:
    """Legacy completions ``logprobs`` for tokens ``start:`` of ``c`` (text offsets from text_offset)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tok, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:], strict=False):
        chosen = entry[tok]
        text = chosen.decoded_token or ""
        tokens.append(text)
        token_lps.append(chosen.logprob)
        top = {lp.decoded_token or "": lp.logprob for lp in _top(entry, k)}
        top.setdefault(text, chosen.logprob)
        tops.append(top)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(prompt_ids: list[int], prompt_lps: PromptLogprobs, k: int,
                  first_text: str) -> dict[str, Any]:
    """Legacy completions ``logprobs`` of the echoed prompt tokens (text offsets from 0): the first
    token has no logprob (``null``, as in OpenAI and vLLM), ``first_text`` is its text."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for tok, entry in zip(prompt_ids, prompt_lps, strict=True):
        if entry is None:
            text, lp, top = first_text, None, None
        else:
            chosen = entry[tok]
            text, lp = chosen.decoded_token or "", chosen.logprob
            top = {x.decoded_token or "": x.logprob for x in _top(entry, k)}
            top.setdefault(text, chosen.logprob)
        tokens.append(text)
        token_lps.append(lp)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def join_logprobs(first: dict[str, Any], then: dict[str, Any] | None) -> dict[str, Any]:
    """Legacy ``logprobs`` of ``first``'s tokens followed by ``then``'s."""
    return first if then is None else {key: first[key] + then[key] for key in first}


def prompt_logprobs_json(prompt_ids: list[int], prompt_lps: PromptLogprobs, k: int
                         ) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs`` response field: per prompt token, null for the first, else token id ->
    {logprob, rank, decoded_token} for the prompt token and the ``k`` most likely tokens."""
    def one(tok: int, entry: dict[int, Logprob]) -> dict[str, dict[str, Any]]:
        return {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                for t, lp in entry.items() if t == tok or lp.rank <= k}

    return [None if e is None else one(t, e) for t, e in zip(prompt_ids, prompt_lps, strict=True)]


def chat_logprobs(c: CompletionOutput, start: int, k: int) -> dict[str, Any]:
    """Chat ``logprobs`` ({"content": [...]}) for tokens ``start:`` of ``c``."""
    def item(lp: Logprob) -> dict[str, Any]:
        text = lp.decoded_token or ""
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for tok, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:], strict=False):
        content.append({**item(entry[tok]), "top_logprobs": [item(lp) for lp in _top(entry, k)]})
    return {"content": content}
