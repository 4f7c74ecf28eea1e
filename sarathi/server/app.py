"""The OpenAI-compatible HTTP API: ``build_app(engine)`` returns a FastAPI app.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /health``,
``GET /metrics``. Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sarathi.engine import LLMEngine, RequestGroup
from sarathi.outputs import CompletionOutput, RequestOutput
from sarathi.server import protocol as P
from sarathi.server.async_engine import (
    AsyncLLMEngine,
    EngineStoppedError,
    QueueFullError,
    RequestAbortedError,
    RequestFailedError,
    RequestStream,
)
from sarathi.server.metrics import CONTENT_TYPE

logger = logging.getLogger("sarathi.server")

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    def response(self) -> JSONResponse:
        body = P.error_body(self.message, _ERROR_TYPES.get(self.status, "error"), self.param, self.status)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _bad_request(e: ValueError, rename: dict[str, str] | None = None) -> APIError:
    msg = str(e)
    param = P.field_of(msg)
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
    def __init__(self, aengine: AsyncLLMEngine, model_name: str) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self.model_name = model_name

    # ---- request preparation -----------------------------------------------------------------
    async def _parse(self, raw: Request, cls: type[BaseModel]) -> Any:
        body = await raw.body()
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"body: malformed JSON ({e})", "body") from None
        if not isinstance(data, dict):
            raise APIError(400, "body: must be a JSON object", "body")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            param, msg = P.describe_validation_error(e)
            raise APIError(400, msg, param) from None

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, self.engine.model_name):
            raise APIError(400, f"model: the model {name!r} does not exist (serving {self.model_name!r})",
                           "model")

    def _prepare(self, raw_req: Any, chat: bool) -> _Job:
        req = raw_req
        self._check_model(req.model)
        tok, eng = self.engine.tokenizer, self.engine
        rename = {"prompt": "messages"} if chat else {}
        try:
            if chat:
                text = tok.apply_chat_template(req.conversation(), req.add_generation_prompt)
                prompts: list[tuple[str | None, list[int]]] = [(text, tok.encode(text, False))]
                logprobs, max_tokens = req.num_logprobs, req.requested_max_tokens
            else:
                prompts = [(p, tok.encode(p)) if isinstance(p, str) else (None, list(p))
                           for p in req.prompts()]
                logprobs, max_tokens = req.logprobs, req.max_tokens
            params = req.sampling_params(max_tokens, logprobs)
            resp_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            kv_slots = eng.kv.num_blocks * eng.kv.block_size
            groups = []
            for i, (text, ids) in enumerate(prompts):
                p = params
                if max_tokens is None:  # as much as the context and the KV cache allow
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

    def _submit(self, job: _Job) -> RequestStream:
        try:
            return self.aengine.submit(job.groups)
        except QueueFullError as e:
            raise APIError(429, str(e), None, {"Retry-After": str(self.aengine.retry_after_s)}) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), None, {"Retry-After": str(self.aengine.retry_after_s)}) from None

    # ---- endpoints ---------------------------------------------------------------------------
    async def create(self, raw: Request, chat: bool) -> Response:
        req = await self._parse(raw, P.ChatCompletionRequest if chat else P.CompletionRequest)
        job = self._prepare(req, chat)
        stream = self._submit(job)
        if req.stream:
            return StreamingResponse(self._sse(job, stream), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finals = await self._collect(stream, raw)
        if finals is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return JSONResponse(self._full_response(job, finals))

    async def _collect(self, stream: RequestStream, raw: Request) -> dict[str, RequestOutput] | None:
        """Wait for every group to finish, aborting them if the client disconnects first."""
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
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                stream.close()
        if work.cancelled():
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


def build_app(engine: LLMEngine | AsyncLLMEngine, api_key: str | None = None,
              served_model_name: str | None = None, max_waiting_requests: int | None = None,
              shutdown_timeout: float = 30.0) -> FastAPI:
    """An OpenAI-compatible app around ``engine``; the engine thread runs during the app's lifespan."""
    aeng = engine if isinstance(engine, AsyncLLMEngine) else AsyncLLMEngine(engine, max_waiting_requests)
    if max_waiting_requests is not None:
        aeng.max_waiting_requests = max_waiting_requests
    name = served_model_name or aeng.engine.model_name
    serving = OpenAIServing(aeng, name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        aeng.start()
        logger.info("serving %s (max_model_len %d)", name, aeng.engine.max_model_len)
        yield
        await aeng.shutdown(shutdown_timeout)

    app = FastAPI(title="sarathi", version="0.1.0", lifespan=lifespan)
    app.state.async_engine = aeng
    app.state.serving = serving

    def check_key(raw: Request) -> None:
        if not api_key:
            return
        given = raw.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(raw: Request, e: Exception) -> JSONResponse:
        logger.error("unhandled error in %s %s", raw.method, raw.url.path, exc_info=e)
        return APIError(500, f"internal server error: {type(e).__name__}").response()

    @app.get("/health")
    async def health() -> Response:
        ok = aeng.is_running and aeng.accepting
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(aeng.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(raw: Request) -> dict[str, Any]:
        check_key(raw)
        card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "sarathi",
                "root": aeng.engine.model_name, "max_model_len": aeng.engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        check_key(raw)
        return await serving.create(raw, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        check_key(raw)
        return await serving.create(raw, chat=True)

    return app
