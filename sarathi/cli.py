"""The ``sarathi`` command: ``sarathi generate "prompt"`` (more subcommands register here)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from sarathi.config import EngineArgs
from sarathi.errors import InvalidArgument


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags, generated from ``EngineArgs`` (vLLM's names, help and defaults in one place)."""
    EngineArgs.add_cli_args(p)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs.from_cli(ns)


def _generate(ns: argparse.Namespace) -> int:
    from sarathi.engine import LLMEngine
    from sarathi.llm import LLM
    from sarathi.sampling_params import SamplingParams
    from sarathi.tokenizer import load_chat_template

    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p,
                            top_k=ns.top_k, seed=ns.sampling_seed)
    args = engine_args_from(ns)
    args.check()  # flag errors before the model loads
    if ns.chat_template is not None and not ns.chat:
        raise InvalidArgument("chat_template", "--chat-template: only used with --chat")
    template = load_chat_template(ns.chat_template)
    llm = LLM.from_engine(LLMEngine(args))
    prompts = [llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": ns.prompt}],
                                                        chat_template=template)
               if ns.chat else ns.prompt]
    t0 = time.perf_counter()
    try:
        out = llm.generate(prompts, params, use_tqdm=False)[0]
        dt = time.perf_counter() - t0
    finally:
        llm.close()  # stops pipeline ranks, writes --trace
    comp = out.outputs[0]
    print(ns.prompt + comp.text if not ns.chat else comp.text)
    n = len(comp.token_ids)
    print(f"[{n} tokens in {dt:.2f}s: {n / dt:.1f} tokens/s, prompt {len(out.prompt_token_ids)} tokens, "
          f"finish_reason={comp.finish_reason}]", file=sys.stderr)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def model_from_positional(ns: argparse.Namespace) -> None:
    """``sarathi serve MODEL`` (as ``vllm serve MODEL``) means ``--model MODEL``; both naming different
    models is an error (InvalidArgument), not a silent choice of one."""
    import os

    tag = getattr(ns, "model_tag", None)
    if tag is None:
        return
    same = ns.model is None or os.path.realpath(os.path.expanduser(ns.model)) == os.path.realpath(
        os.path.expanduser(tag))
    if not same:
        raise InvalidArgument("model", f"model: the positional MODEL {tag!r} and --model {ns.model!r} "
                                       "differ; give one of them")
    ns.model = tag


def _serve(ns: argparse.Namespace) -> int:
    import os

    from sarathi.server import run_server

    model_from_positional(ns)
    args = engine_args_from(ns)
    args.check()  # flag errors before the model loads
    api_key = ns.api_key or os.environ.get("SARATHI_API_KEY") or None
    backlog = ns.max_stream_backlog if ns.max_stream_backlog > 0 else None
    return run_server(args, host=ns.host, port=ns.port, api_key=api_key,
                      served_model_name=ns.served_model_name, max_waiting_requests=ns.max_waiting_requests,
                      shutdown_timeout=ns.shutdown_timeout, log_level=ns.log_level,
                      chat_template=ns.chat_template, generation_config=ns.generation_config,
                      max_request_body_bytes=ns.max_request_body_bytes, max_stream_backlog=backlog,
                      stream_stall_timeout=ns.stream_stall_timeout,
                      enable_auto_tool_choice=ns.enable_auto_tool_choice,
                      tool_call_parser=ns.tool_call_parser,
                      exclude_tools_when_tool_choice_none=ns.exclude_tools_when_tool_choice_none)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    from sarathi import __version__

    parser = argparse.ArgumentParser(
        prog="sarathi", description="An LLM inference engine with SARATHI scheduling (chunked prefills and "
                                    "decode-maximal batching).")
    parser.add_argument("--version", action="version", version=f"sarathi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    g = sub.add_parser("generate", help="complete one prompt and print the text")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="with --chat: a jinja file, or the template text itself, replacing the model's "
                        "chat template")
    add_engine_args(g)
    handlers["generate"] = _generate
    s = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    s.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model to serve, as `vllm serve MODEL`: the same as --model MODEL")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' "
                   "(default: $SARATHI_API_KEY, else no key)")
    s.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients may send; the first is the one responses report and "
                        "/v1/models lists them all (default: --model)")
    s.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="a jinja file, or the template text itself, replacing the model's chat template "
                        "(checked at start-up)")
    s.add_argument("--generation-config", default="auto", metavar="auto|vllm|FOLDER",
                   help="default sampling parameters of requests that do not set them: auto: the model's "
                        "generation_config.json (HF folders; GGUF files have none); vllm: none; FOLDER: "
                        "FOLDER/generation_config.json (default: auto)")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="parse tool calls out of the output of chat requests with tools (tool_choice 'auto', "
                        "the default when tools are sent) with --tool-call-parser; without it such requests "
                        "are refused (as vLLM)")
    s.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="how tool calls are written in the model's output, for --enable-auto-tool-choice: "
                        "hermes (<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>: Hermes 2 Pro, "
                        "Qwen2.5, Qwen3)")
    s.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help="with tool_choice 'none', leave the tools out of the prompt (default: they are "
                        "rendered, and no call is parsed)")
    s.add_argument("--max-waiting-requests", type=int, default=None,
                   help="refuse new requests with 429 while this many are waiting (default: unbounded)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish on SIGINT/SIGTERM")
    s.add_argument("--max-request-body-bytes", type=_positive_int, default=8 << 20,
                   help="refuse larger request bodies with 413 (default: 8 MiB)")
    s.add_argument("--max-stream-backlog", type=int, default=128,
                   help="abort a streamed request once its client, its socket buffers full, has left more "
                        "than this many outputs per prompt unread for --stream-stall-timeout seconds "
                        "(default 128; 0: never)")
    s.add_argument("--stream-stall-timeout", type=float, default=5.0,
                   help="seconds without reading before a backlogged stream is aborted (default 5)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(s)
    handlers["serve"] = _serve
    from sarathi.bench.cli import add_bench_parser

    add_bench_parser(sub, handlers)  # sarathi bench throughput|profile|serve|compare|workload
    from sarathi.sim.cli import add_simulate_parser, add_tune_parser

    add_simulate_parser(sub, handlers)  # sarathi simulate: the scheduler on a cost model, virtual time
    add_tune_parser(sub, handlers)  # sarathi tune: the token budget from the P:D rule and a TBT SLO
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser, handlers = build_parser()
    ns = parser.parse_args(argv)
    try:
        return handlers[ns.command](ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
