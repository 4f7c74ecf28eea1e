"""Serving OpenAI requests: validate and tokenize (off the event loop), submit, shape the response.

``OpenAIServing.create`` is the whole life of one completions or chat request: read the body within its
limits, parse and prepare it in a worker thread, submit it to the ``AsyncLLMEngine``, then either collect
the final outputs or stream them as server-sent events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sarathi.engine import RequestGroup
from sarathi.errors import InvalidArgument
from sarathi.outputs import CompletionOutput, RequestOutput
from sarathi.server import protocol as P
from sarathi.server.async_engine import (
    AsyncLLMEngine,
    EngineStoppedError,
    QueueFullError,
    RequestAbortedError,
    RequestFailedError,
    RequestStream,
    StreamBacklog,
)
from sarathi.server.chat import render_chat
from sarathi.server.generation_config import GenerationDefaults
from sarathi.server.intake import (
    DEFAULT_MAX_BODY_BYTES,
    APIError,
    PromptEncoder,
    check_content_type,
    parse,
    read_body,
)
from sarathi.server.tool_parsers import StreamingToolParser, ToolParser
from sarathi.server.tools import ToolOptions

logger = logging.getLogger("sarathi.server")

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


def error_response(e: APIError) -> Response:
    body = P.error_body(e.message, _ERROR_TYPES.get(e.status, "error"), e.param, e.status)
    # ASCII-escaped: a message may quote client input, which can hold lone surrogates that UTF-8 refuses.
    return Response(json.dumps(body), status_code=e.status, headers=e.headers, media_type="application/json")


def _bad_request(e: ValueError, rename: dict[str, str] | None = None) -> APIError:
    msg = str(e)
    param = e.field if isinstance(e, InvalidArgument) else None
    new = (rename or {}).get(param or "")
    if param and new:  # e.g. the engine's "prompt: ..." is about the chat's "messages"
        msg, param = f"{new}: the templated {param} has{msg.removeprefix(param + ':')}", new
    return APIError(400, msg, param)


@dataclasses.dataclass
class _Job:
    """One validated HTTP request: its groups, and how to shape the response."""

    chat: bool
    req: P.CompletionRequest | P.ChatCompletionRequest
    groups: list[RequestGroup]
    resp_id: str
    model: str
    logprobs: int | None
    echo_texts: list[str] | None = None  # completions with echo: each prompt's text
    echo_heads: list[str] | None = None  # ... and its first token's text (echo with logprobs)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    tool_parser: ToolParser | None = None  # chat with tool_choice "auto": tool calls parsed from the text

    @property
    def n(self) -> int:
        return self.req.n

    def index(self, out: RequestOutput, c: CompletionOutput) -> int:
        return int(out.request_id.rsplit("-", 1)[1]) * self.n + c.index

    def holdback(self) -> int:
        """Characters kept back while streaming, since a stop string may still cut them."""
        p = self.groups[0].seqs[0].params
        if p.include_stop_str_in_output or not p.stop_strings:
            return 0
        return max(len(s) for s in p.stop_strings) - 1

    def logprobs_of(self, c: CompletionOutput, start: int, text_offset: int) -> dict[str, Any] | None:
        if self.logprobs is None or c.logprobs is None:
            return None
        if self.chat:
            return P.chat_logprobs(c, start, self.logprobs)
        return P.completion_logprobs(c, start, self.logprobs, text_offset)

    def usage(self, finals: dict[str, RequestOutput]) -> dict[str, Any]:
        """Completion tokens count every generated sequence (best_of candidates too), none for
        ``echo`` with ``max_tokens: 0`` (whose one sampled token is dropped)."""
        return P.usage(sum(len(g.prompt_token_ids) for g in self.groups),
                       0 if self.echo_only else sum(o.num_generated_tokens for o in finals.values()),
                       sum(o.num_cached_tokens for o in finals.values()))

    @property
    def echo_only(self) -> bool:
        return isinstance(self.req, P.CompletionRequest) and self.req.echo_only

    def visible(self, c: CompletionOutput) -> CompletionOutput:
        """``c`` as the client sees it: with ``echo`` and ``max_tokens: 0``, nothing generated."""
        if not self.echo_only:
            return c
        return dataclasses.replace(c, text="", token_ids=[], logprobs=[] if c.logprobs is not None else None,
                                   finish_reason="length" if c.finished else None, stop_reason=None)

    def echo_len(self, index: int) -> int:
        """Characters of echoed prompt before the generated text of choice ``index``."""
        return len(self.echo_texts[index // self.n]) if self.echo_texts else 0

    def echo_of(self, out: RequestOutput) -> tuple[str, dict[str, Any] | None]:
        """The echoed prompt of ``out``'s choices and, with ``logprobs``, its tokens' logprobs."""
        g = int(out.request_id.rsplit("-", 1)[1])
        assert self.echo_texts is not None
        if self.logprobs is None or out.prompt_logprobs is None or self.echo_heads is None:
            return self.echo_texts[g], None
        return self.echo_texts[g], P.echo_logprobs(out.prompt_token_ids, out.prompt_logprobs, self.logprobs,
                                                   self.echo_heads[g])

    def prompt_logprobs_of(self, out: RequestOutput) -> list[Any] | None:
        """vLLM's ``prompt_logprobs`` field, when the request asked for it."""
        k = self.req.prompt_logprobs
        if k is None or out.prompt_logprobs is None:
            return None
        return P.prompt_logprobs_json(out.prompt_token_ids, out.prompt_logprobs, k)


class OpenAIServing:
    """The completions and chat endpoints of one engine.

    ``model_names``: the names clients may send (``--served-model-name``; the first is the one responses
    report). ``chat_template``: the server's template text, replacing the model's (None: the model's).
    ``defaults``: sampling defaults for fields a request leaves unset (``--generation-config``).
    ``tools``: the tool flags (``--enable-auto-tool-choice``, ``--tool-call-parser``, ...).
    """

    def __init__(self, aengine: AsyncLLMEngine, model_names: str | Sequence[str],
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, backlog: StreamBacklog | None = None,
                 chat_template: str | None = None, defaults: GenerationDefaults | None = None,
                 tools: ToolOptions | None = None) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self.model_names = [model_names] if isinstance(model_names, str) else list(model_names)
        if not self.model_names:
            raise ValueError("served_model_name: give at least one name")
        self.model_name = self.model_names[0]
        self.max_body_bytes = max_body_bytes
        self.backlog = backlog
        self.chat_template = chat_template
        self.defaults = defaults or GenerationDefaults()
        self.tools = (tools or ToolOptions()).check()
        self.encoder = PromptEncoder(self.engine.tokenizer, self.engine.max_model_len)

    # ---- request preparation (in a worker thread) ------------------------------------------------
    def check_model(self, name: str | None) -> None:
        """404 for a model we do not serve (as OpenAI and vLLM answer); every served name is accepted."""
        if name is not None and name not in self.model_names:
            served = ", ".join(repr(n) for n in self.model_names)
            raise APIError(404, f"model: the model {name!r} does not exist (serving {served})", "model")

    def render_chat(self, messages: list[dict[str, Any]], fields: P.ChatTemplateFields,
                    include_tools: bool = True) -> str:
        """The prompt text of a chat (raises InvalidArgument naming the field)."""
        return render_chat(self.engine.tokenizer, messages, fields, self.chat_template, include_tools)

    def _prepare(self, body: bytes, chat: bool) -> _Job:
        """Parse, validate and tokenize: linear in the body's size, so never on the event loop."""
        req = parse(body, P.ChatCompletionRequest if chat else P.CompletionRequest)
        self.check_model(req.model)
        tok, eng, enc = self.engine.tokenizer, self.engine, self.encoder
        rename = {"prompt": "messages"} if chat else {}
        try:
            parser = forced = None
            if chat:
                parser, include_tools, forced = self.tools.for_request(req)
                text = self.render_chat(req.conversation(), req, include_tools)
                prompts: list[tuple[str | None, list[int]]] = [(text, enc.encode(text, False))]
                logprobs = req.num_logprobs
            else:
                prompts = [(p, enc.encode(p)) if isinstance(p, str) else (None, list(p))
                           for p in req.prompts()]
                logprobs = req.logprobs
            max_tokens = req.requested_max_tokens
            params = req.sampling_params(max_tokens, logprobs, self.defaults.params)
            if forced is not None:  # tool_choice "required" / a named function: the output is the call
                if params.structured_outputs is not None:
                    name = params.structured_outputs.field_name
                    what = "'required'" if req.tool_choice == "required" else "naming a function"
                    raise InvalidArgument(name, f"{name}: cannot be combined with tool_choice {what}, "
                                                "which constrains the output to the call itself")
                params = dataclasses.replace(params, structured_outputs=forced)
            # Without max_tokens in the request: the generation config's max_new_tokens, else 16 for
            # completions (OpenAI's default) and all the room left for chat; capped by that room.
            default_max = self.defaults.params.get("max_tokens",
                                                   None if chat else P.DEFAULT_COMPLETION_MAX_TOKENS)
            resp_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            kv_slots = eng.kv.num_blocks * eng.kv.block_size
            groups = []
            for i, (text, ids) in enumerate(prompts):
                p = params
                if max_tokens is None:
                    room = max(1, min(eng.max_model_len, kv_slots) - len(ids))
                    p = dataclasses.replace(params, max_tokens=min(default_max or room, room))
                groups.append(eng.make_request(f"{resp_id}-{i}", {"prompt": text, "prompt_token_ids": ids},
                                               p))
        except ValueError as e:
            raise _bad_request(e, rename) from None
        job = _Job(chat, req, groups, resp_id, self.model_name, logprobs, tool_parser=parser)
        if not chat and req.echo:
            job.echo_texts = [t if t is not None else tok.decode(ids) for t, ids in prompts]
            if logprobs is not None:
                job.echo_heads = [tok.decode(ids[:1], False) for _, ids in prompts]
        return job

    def _submit(self, job: _Job, backlog: StreamBacklog | None = None) -> RequestStream:
        try:
            return self.aengine.submit(job.groups, backlog)
        except QueueFullError as e:
            raise APIError(429, str(e), None, {"Retry-After": str(self.aengine.retry_after_s)}) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), None, {"Retry-After": str(self.aengine.retry_after_s)}) from None

    # ---- endpoints ---------------------------------------------------------------------------
    async def create(self, raw: Request, chat: bool) -> Response:
        check_content_type(raw)
        body = await read_body(raw, self.max_body_bytes)
        job = await asyncio.to_thread(self._prepare, body, chat)
        if job.req.stream:
            stream = self._submit(job, self.backlog)
            return StreamingResponse(self._sse(job, stream), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finals = await self._collect(self._submit(job), raw)
        if finals is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return JSONResponse(self._full_response(job, finals))

    async def _collect(self, stream: RequestStream, raw: Request) -> dict[str, RequestOutput] | None:
        """Wait for every group to finish; if the client disconnects first, abort them and return None."""
        async def drain() -> dict[str, RequestOutput]:
            finals: dict[str, RequestOutput] = {}
            async for out in stream:
                if out.finished:
                    finals[out.request_id] = out
            return finals

        async def disconnected() -> None:
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # the client left (or this handler was cancelled): abort the requests
                work.cancel()
                stream.close()
        if work not in done:
            # cancel() only asks: the task is not done yet, so work.result() would raise
            # InvalidStateError. Nobody needs the result; the abort went out with stream.close().
            logger.info("client disconnected; aborted %s", stream.request_ids)
            return None
        try:
            return work.result()
        except (RequestFailedError, RequestAbortedError) as e:
            raise APIError(500 if isinstance(e, RequestFailedError) else 503, str(e)) from None

    def _full_response(self, job: _Job, finals: dict[str, RequestOutput]) -> dict[str, Any]:
        choices = []
        for g in job.groups:
            out = finals[g.request_id]
            prefix, echo_lp = job.echo_of(out) if job.echo_texts else ("", None)  # shared by the n choices
            plp = None if job.chat else job.prompt_logprobs_of(out)
            for c in map(job.visible, out.outputs):
                choice: dict[str, Any] = {"index": job.index(out, c),
                                          "logprobs": job.logprobs_of(c, 0, 0),
                                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if job.chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                    if job.tool_parser is not None:
                        parsed = job.tool_parser.parse(c.text)
                        if parsed.tool_calls:
                            choice["message"] = {"role": "assistant", "content": parsed.content,
                                                 "tool_calls": [t.to_json() for t in parsed.tool_calls]}
                            choice["finish_reason"] = job.tool_parser.finish_reason(c.finish_reason)
                else:
                    choice["text"] = prefix + c.text
                    if prefix:  # the completion's text offsets start after the echoed prompt
                        choice["logprobs"] = job.logprobs_of(c, 0, len(prefix))
                    if echo_lp is not None:
                        choice["logprobs"] = P.join_logprobs(echo_lp, choice["logprobs"])
                    if plp is not None:
                        choice["prompt_logprobs"] = plp
                choices.append(choice)
        choices.sort(key=lambda ch: ch["index"])
        obj = "chat.completion" if job.chat else "text_completion"
        resp = {**P.envelope(job.resp_id, obj, job.model, job.created), "choices": choices,
                "usage": job.usage(finals)}
        if job.chat and (plp := job.prompt_logprobs_of(finals[job.groups[0].request_id])) is not None:
            resp["prompt_logprobs"] = plp  # vLLM puts the chat's prompt logprobs beside the choices
        return resp

    async def _sse(self, job: _Job, stream: RequestStream) -> AsyncIterator[str]:
        """OpenAI's server-sent events: one chunk per new text, then ``data: [DONE]``."""
        obj = "chat.completion.chunk" if job.chat else "text_completion"
        head = P.envelope(job.resp_id, obj, job.model, job.created)
        hold = job.holdback()
        sent_chars: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        done: set[int] = set()
        finals: dict[str, RequestOutput] = {}
        tool_streams: dict[int, StreamingToolParser] = {}

        def event(choices: list[dict[str, Any]]) -> str:
            chunk = {**head, "choices": choices}
            if job.req.include_usage:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"

        try:
            if job.chat:  # the role comes first, as in OpenAI's streams
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(job.groups) * job.n)])
            elif job.echo_texts and job.logprobs is None:
                yield event([{"index": i, "text": job.echo_texts[i // job.n], "logprobs": None,
                              "finish_reason": None} for i in range(len(job.groups) * job.n)])
            echoed: set[str] = set()
            async for out in stream:
                if out.finished:
                    finals[out.request_id] = out
                if job.echo_texts and job.logprobs is not None and out.request_id not in echoed:
                    # echo with logprobs: the prompt's logprobs come with the group's first output
                    echoed.add(out.request_id)
                    text, echo_lp = job.echo_of(out)
                    first = int(out.request_id.rsplit("-", 1)[1]) * job.n
                    yield event([{"index": first + j, "text": text, "logprobs": echo_lp,
                                  "finish_reason": None} for j in range(job.n)])
                rounds: list[list[dict[str, Any]]] = []  # one event per round: a choice's deltas in order
                for c in map(job.visible, out.outputs):
                    i = job.index(out, c)
                    if i in done:
                        continue
                    start, tok_start = sent_chars.get(i, 0), sent_tokens.get(i, 0)
                    end = len(c.text) if c.finished else max(start, len(c.text) - hold)
                    delta, new_tokens = c.text[start:end], len(c.token_ids) > tok_start
                    if not (delta or c.finished or (new_tokens and job.logprobs is not None)):
                        continue
                    sent_chars[i] = end
                    finish_reason = c.finish_reason
                    if job.tool_parser is not None:  # content and tool-call deltas, text held while undecided
                        if i not in tool_streams:
                            tool_streams[i] = job.tool_parser.stream()
                        parser = tool_streams[i]
                        deltas = parser.feed(delta) + (parser.finish() if c.finished else [])
                        if not (deltas or c.finished or (new_tokens and job.logprobs is not None)):
                            continue
                        if c.finished and parser.tool_calls:
                            finish_reason = job.tool_parser.finish_reason(finish_reason)
                    elif job.chat:
                        deltas = [{"content": delta}] if delta else []
                    else:
                        deltas = [{"text": delta}]
                    lp = job.logprobs_of(c, tok_start, start + job.echo_len(i))
                    sent_tokens[i] = len(c.token_ids)
                    if c.finished:
                        done.add(i)
                    deltas = deltas or [{}]
                    for k, d in enumerate(deltas):
                        last = k == len(deltas) - 1
                        choice: dict[str, Any] = {"index": i, "logprobs": lp if k == 0 else None,
                                                  "finish_reason": finish_reason if last else None}
                        if job.chat:
                            choice["delta"] = d
                        else:
                            choice["text"] = d["text"]
                        if c.finished and last:
                            choice["stop_reason"] = c.stop_reason
                        if k == len(rounds):
                            rounds.append([])
                        rounds[k].append(choice)
                for choices in rounds:
                    yield event(choices)
            if job.req.include_usage:
                usage_chunk = {**head, "choices": [], "usage": job.usage(finals)}
                yield f"data: {json.dumps(usage_chunk, separators=(',', ':'))}\n\n"
        except (RequestFailedError, RequestAbortedError) as e:
            logger.warning("stream %s failed: %s", job.resp_id, e)
            body = P.error_body(str(e), "server_error", None, 500)
            yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
        finally:
            stream.close()
        yield "data: [DONE]\n\n"
