"""The OpenAI-compatible HTTP API: ``build_app(engine)`` returns a FastAPI app.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /health``,
``GET|POST /ping``, ``GET /version``, ``POST /tokenize``, ``POST /detokenize``, ``GET /metrics``, and
``/docs``, ``/redoc``, ``/openapi.json`` (behind the API key when one is set). Every error is an
OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from sarathi import __version__
from sarathi.engine import LLMEngine
from sarathi.errors import InvalidArgument
from sarathi.server.async_engine import AsyncLLMEngine, StreamBacklog
from sarathi.server.generation_config import load_generation_defaults, log_generation_defaults
from sarathi.server.intake import DEFAULT_MAX_BODY_BYTES, APIError
from sarathi.server.metrics import CONTENT_TYPE
from sarathi.server.serving import OpenAIServing, error_response
from sarathi.server.tokens import TokenServing
from sarathi.server.tools import ToolOptions
from sarathi.tokenizer import load_chat_template

logger = logging.getLogger("sarathi.server")

DEFAULT_BACKLOG = StreamBacklog()


def served_model_names(served_model_name: str | Sequence[str] | None, model_name: str) -> list[str]:
    """``--served-model-name``: one name or several (the first is reported in responses); none: the
    engine's ``model_name``. Raises InvalidArgument for an empty name."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise InvalidArgument("served_model_name", f"served_model_name: names must be non-empty strings, "
                                                   f"got {names!r}")
    return list(dict.fromkeys(names)) or [model_name]


def build_app(engine: LLMEngine | AsyncLLMEngine, api_key: str | None = None,
              served_model_name: str | Sequence[str] | None = None, max_waiting_requests: int | None = None,
              shutdown_timeout: float = 30.0, max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_stream_backlog: int | None = DEFAULT_BACKLOG.max_outputs,
              stream_stall_timeout: float = DEFAULT_BACKLOG.stall_s, chat_template: str | None = None,
              generation_config: str = "auto", enable_auto_tool_choice: bool = False,
              tool_call_parser: str | None = None,
              exclude_tools_when_tool_choice_none: bool = False) -> FastAPI:
    """An OpenAI-compatible app around ``engine``; the engine thread runs during the app's lifespan.

    ``max_request_body_bytes``: larger bodies get 413. ``max_stream_backlog`` / ``stream_stall_timeout``:
    a streamed request whose client leaves more than that many outputs (per prompt) unread and reads
    nothing for that many seconds is aborted (None: never). ``served_model_name``: one name or a list
    (every one is accepted and listed by /v1/models; the first is reported in responses).
    ``chat_template``: a jinja file or template text replacing the model's (``--chat-template``).
    ``generation_config``: ``auto`` | ``vllm`` | a folder (``--generation-config``): where the default
    sampling parameters of requests come from. ``enable_auto_tool_choice`` / ``tool_call_parser`` /
    ``exclude_tools_when_tool_choice_none``: vLLM's tool flags (``sarathi.server.tools``). Raises
    InvalidArgument for a bad one of these.
    """
    eng = engine.engine if isinstance(engine, AsyncLLMEngine) else engine
    names = served_model_names(served_model_name, eng.model_name)
    template = load_chat_template(chat_template)
    defaults = load_generation_defaults(generation_config, eng.args.model)
    tools = ToolOptions(enable_auto_tool_choice, tool_call_parser,
                        exclude_tools_when_tool_choice_none).check()
    aeng = engine if isinstance(engine, AsyncLLMEngine) else AsyncLLMEngine(engine, max_waiting_requests)
    if max_waiting_requests is not None:
        aeng.max_waiting_requests = max_waiting_requests
    backlog = None if max_stream_backlog is None else StreamBacklog(max_stream_backlog, stream_stall_timeout)
    serving = OpenAIServing(aeng, names, max_request_body_bytes, backlog, template, defaults, tools)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        aeng.start()
        logger.info("serving %s (max_model_len %d)", ", ".join(names), aeng.engine.max_model_len)
        if chat_template is not None:
            is_file = os.path.isfile(os.path.expanduser(chat_template))
            logger.info("chat template: %s (--chat-template)", chat_template if is_file else "template text")
        log_generation_defaults(defaults, generation_config)
        if tools.enable_auto_tool_choice:
            logger.info("tool calls: tool_choice 'auto' parsed with the %s parser", tools.tool_call_parser)
        yield
        await aeng.shutdown(shutdown_timeout)

    # FastAPI's own docs routes cannot check a key, so ours replace them. No slash redirects: a client
    # POSTing to "/v1/completions/" should learn its URL is wrong, not be bounced (and some clients
    # replay a redirected POST as a GET).
    app = FastAPI(title="sarathi", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, redirect_slashes=False)
    app.state.async_engine = aeng
    app.state.serving = serving

    def check_key(raw: Request) -> None:
        if not api_key:
            return
        given = raw.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> Response:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> Response:
        return error_response(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(ClientDisconnect)
    async def _gone(raw: Request, _: ClientDisconnect) -> Response:
        logger.info("client disconnected while sending %s %s", raw.method, raw.url.path)
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def _crash(raw: Request, e: Exception) -> Response:
        logger.error("unhandled error in %s %s", raw.method, raw.url.path, exc_info=e)
        return error_response(APIError(500, f"internal server error: {type(e).__name__}"))

    @app.get("/health")
    async def health() -> Response:
        ok = aeng.is_running and aeng.accepting
        body: dict[str, str] = {"status": "ok" if ok else "unavailable"}
        if aeng.unavailable is not None:  # the executor failed for good (e.g. a pipeline rank died)
            body["reason"] = aeng.unavailable
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(aeng.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(raw: Request) -> Response:
        check_key(raw)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(raw: Request) -> Response:
        check_key(raw)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="sarathi")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(raw: Request) -> Response:
        check_key(raw)
        return get_redoc_html(openapi_url="/openapi.json", title="sarathi")

    @app.get("/v1/models")
    async def models(raw: Request) -> dict[str, Any]:
        """One card per served name, as vLLM lists them (``root``: the model they all serve)."""
        check_key(raw)
        created = int(time.time())
        cards = [{"id": n, "object": "model", "created": created, "owned_by": "sarathi",
                  "root": aeng.engine.model_name, "max_model_len": aeng.engine.max_model_len} for n in names]
        return {"object": "list", "data": cards}

    tokens = TokenServing(serving)

    @app.post("/tokenize")
    async def tokenize(raw: Request) -> dict[str, Any]:
        check_key(raw)
        return await tokens.tokenize(raw)

    @app.post("/detokenize")
    async def detokenize(raw: Request) -> dict[str, Any]:
        check_key(raw)
        return await tokens.detokenize(raw)

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        check_key(raw)
        return await serving.create(raw, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        check_key(raw)
        return await serving.create(raw, chat=True)

    return app
