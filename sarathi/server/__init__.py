"""OpenAI-compatible server: ``sarathi serve`` (or ``build_app(engine)`` to embed it)."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Generator, Sequence
from typing import Any

from sarathi.config import EngineArgs
from sarathi.server.app import build_app
from sarathi.server.async_engine import AsyncLLMEngine

__all__ = ["AsyncLLMEngine", "build_app", "run_server"]

logger = logging.getLogger("sarathi.server")


def _uvicorn_server(config: Any) -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, but SIGINT/SIGTERM end in a plain exit 0 after the graceful shutdown
        (uvicorn re-raises the signal once it has shut down, which would kill the process)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            def on_signal(sig: int, frame: Any) -> None:
                logger.info("received %s: finishing in-flight requests, then exiting",
                            signal.Signals(sig).name)
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

            old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return _Server(config)


def run_server(args: EngineArgs, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | Sequence[str] | None = None, max_waiting_requests: int | None = None,
               shutdown_timeout: float = 30.0, log_level: str = "info", chat_template: str | None = None,
               generation_config: str = "auto", enable_auto_tool_choice: bool = False,
               tool_call_parser: str | None = None, exclude_tools_when_tool_choice_none: bool = False,
               **limits: Any) -> int:
    """Load the model, serve until SIGINT/SIGTERM, shut down gracefully; returns the exit code.
    ``limits``: ``build_app``'s request limits (max_request_body_bytes, max_stream_backlog,
    stream_stall_timeout). A bad served name, chat template, generation config or tool flag raises
    InvalidArgument before the model is loaded."""
    import uvicorn

    from sarathi.engine import LLMEngine
    from sarathi.server.app import served_model_names
    from sarathi.server.generation_config import load_generation_defaults
    from sarathi.server.tools import ToolOptions
    from sarathi.tokenizer import load_chat_template

    args.check()
    served_model_names(served_model_name, "")
    load_chat_template(chat_template)
    load_generation_defaults(generation_config, args.model)
    tools = dict(enable_auto_tool_choice=enable_auto_tool_choice, tool_call_parser=tool_call_parser,
                 exclude_tools_when_tool_choice_none=exclude_tools_when_tool_choice_none)
    ToolOptions(**tools).check()
    engine = LLMEngine(args)
    app = build_app(engine, api_key=api_key, served_model_name=served_model_name,
                    max_waiting_requests=max_waiting_requests, shutdown_timeout=shutdown_timeout,
                    chat_template=chat_template, generation_config=generation_config, **tools, **limits)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=max(1, round(shutdown_timeout)))
    server = _uvicorn_server(config)
    server.run()
    return 0 if server.started else 1
