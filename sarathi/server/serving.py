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
from collections.abc import AsyncIterator
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
from sarathi.server.intake import (
    DEFAULT_MAX_BODY_BYTES,
    APIError,
    PromptEncoder,
    check_content_type,
    parse,
    read_body,
)

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
    echo_texts: list[str] | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

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

    def usage(self, finals: dict[str, RequestOutput]) -> dict[str, int]:
        return P.usage(sum(len(g.prompt_token_ids) for g in self.groups),
                       sum(len(c.token_ids) for o in finals.values() for c in o.outputs))


class OpenAIServing:
    def __init__(self, aengine: AsyncLLMEngine, model_name: str,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, backlog: StreamBacklog | None = None) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.backlog = backlog
        self.encoder = PromptEncoder(self.engine.tokenizer, self.engine.max_model_len)

    # ---- request preparation (in a worker thread) ------------------------------------------------
    def check_model(self, name: str | None) -> None:
        """404 for a model we do not serve (as OpenAI and vLLM answer)."""
        if name is not None and name not in (self.model_name, self.engine.model_name):
            raise APIError(404, f"model: the model {name!r} does not exist (serving {self.model_name!r})",
                           "model")

    def _prepare(self, body: bytes, chat: bool) -> _Job:
        """Parse, validate and tokenize: linear in the body's size, so never on the event loop."""
        req = parse(body, P.ChatCompletionRequest if chat else P.CompletionRequest)
        self.check_model(req.model)
        tok, eng, enc = self.engine.tokenizer, self.engine, self.encoder
        rename = {"prompt": "messages"} if chat else {}
        try:
            if chat:
                text = tok.apply_chat_template(req.conversation(), req.add_generation_prompt)
                prompts: list[tuple[str | None, list[int]]] = [(text, enc.encode(text, False))]
                logprobs, max_tokens = req.num_logprobs, req.requested_max_tokens
            else:
                prompts = [(p, enc.encode(p)) if isinstance(p, str) else (None, list(p))
                           for p in req.prompts()]
                logprobs, max_tokens = req.logprobs, req.max_tokens
            params = req.sampling_params(max_tokens, logprobs)
            resp_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            kv_slots = eng.kv.num_blocks * eng.kv.block_size
            groups = []
            for i, (text, ids) in enumerate(prompts):
                p = params
                if max_tokens is None:  # chat: as much as the context and the KV cache allow
                    p = dataclasses.replace(params, max_tokens=max(1, min(eng.max_model_len, kv_slots)
                                                                   - len(ids)))
                groups.append(eng.make_request(f"{resp_id}-{i}", {"prompt": text, "prompt_token_ids": ids},
                                               p))
        except ValueError as e:
            raise _bad_request(e, rename) from None
        job = _Job(chat, req, groups, resp_id, self.model_name, logprobs)
        if not chat and req.echo:
            job.echo_texts = [t if t is not None else tok.decode(ids) for t, ids in prompts]
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
            for c in out.outputs:
                choice: dict[str, Any] = {"index": job.index(out, c),
                                          "logprobs": job.logprobs_of(c, 0, 0),
                                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if job.chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                else:
                    prefix = job.echo_texts[job.index(out, c) // job.n] if job.echo_texts else ""
                    choice["text"] = prefix + c.text
                choices.append(choice)
        choices.sort(key=lambda ch: ch["index"])
        obj = "chat.completion" if job.chat else "text_completion"
        return {**P.envelope(job.resp_id, obj, job.model, job.created), "choices": choices,
                "usage": job.usage(finals)}

    async def _sse(self, job: _Job, stream: RequestStream) -> AsyncIterator[str]:
        """OpenAI's server-sent events: one chunk per new text, then ``data: [DONE]``."""
        obj = "chat.completion.chunk" if job.chat else "text_completion"
        head = P.envelope(job.resp_id, obj, job.model, job.created)
        hold = job.holdback()
        sent_chars: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        done: set[int] = set()
        finals: dict[str, RequestOutput] = {}

        def event(choices: list[dict[str, Any]]) -> str:
            chunk = {**head, "choices": choices}
            if job.req.include_usage:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"

        try:
            if job.chat:  # the role comes first, as in OpenAI's streams
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(job.groups) * job.n)])
            elif job.echo_texts:
                yield event([{"index": i, "text": job.echo_texts[i // job.n], "logprobs": None,
                              "finish_reason": None} for i in range(len(job.groups) * job.n)])
            async for out in stream:
                if out.finished:
                    finals[out.request_id] = out
                choices = []
                for c in out.outputs:
                    i = job.index(out, c)
                    if i in done:
                        continue
                    start, tok_start = sent_chars.get(i, 0), sent_tokens.get(i, 0)
                    end = len(c.text) if c.finished else max(start, len(c.text) - hold)
                    delta, new_tokens = c.text[start:end], len(c.token_ids) > tok_start
                    if not (delta or c.finished or (new_tokens and job.logprobs is not None)):
                        continue
                    lp = job.logprobs_of(c, tok_start, start)
                    sent_chars[i], sent_tokens[i] = end, len(c.token_ids)
                    if c.finished:
                        done.add(i)
                    choice: dict[str, Any] = {"index": i, "logprobs": lp,
                                              "finish_reason": c.finish_reason}
                    if job.chat:
                        choice["delta"] = {"content": delta} if delta else {}
                    else:
                        choice["text"] = delta
                    if c.finished:
                        choice["stop_reason"] = c.stop_reason
                    choices.append(choice)
                if choices:
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
