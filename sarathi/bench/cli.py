"""The ``sarathi bench`` command group: throughput, profile, serve, soak, compare, workload.

Only argparse is imported at module level, so ``sarathi --help`` stays fast; each command imports
torch and the engine when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _common(p: argparse.ArgumentParser, out_name: str,
            engine_flags: tuple[str, ...] = ("model", "dtype")) -> None:
    from sarathi.config import EngineArgs

    EngineArgs.add_cli_args(p, only=engine_flags)  # the engine's own flags, help and defaults
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-limits", action="store_true", help="skip measuring GEMM peak / memory bandwidth")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default=None, help=f"file name suffix: {out_name}_<tag>.json (default: preset)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _load(ns: argparse.Namespace) -> tuple[Any, dict[str, Any] | None, int]:
    """Set threads, measure limits (before the model takes memory bandwidth), load the model."""
    from sarathi.bench.common import measure_limits, set_threads
    from sarathi.llm import LLM

    threads = set_threads(ns.threads)
    limits = None if ns.no_limits else measure_limits(threads, quick=ns.preset == "quick")
    llm = LLM(model=ns.model, dtype=ns.dtype, kv_cache_memory="64MiB", trace=getattr(ns, "trace", None))
    return llm, limits, threads


def _args_dict(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()
            if k not in ("command", "bench_command")}


def _throughput(ns: argparse.Namespace) -> int:
    from sarathi.bench import throughput as tp
    from sarathi.bench import workloads
    from sarathi.bench.common import loadavg, run_meta

    cfg = dict(tp.PRESETS[ns.preset])
    for key in ("prompt_lens", "pd_ratios", "num_requests", "max_num_seqs", "chunk_sizes", "sharegpt",
                "sharegpt_scale", "ranged"):
        if getattr(ns, key) is not None:
            cfg[key] = getattr(ns, key)
    policies = tp.make_policies(ns.policies, cfg["chunk_sizes"])
    llm, limits, threads = _load(ns)
    vocab = llm.engine.model_config.vocab_size
    if ns.workload_file:
        wls = [tp.Workload(f"file:{Path(f).stem}", "file", workloads.load_workload(f))
               for f in ns.workload_file]
    else:
        wls = tp.sweep_workloads(cfg["prompt_lens"], cfg["pd_ratios"], cfg["num_requests"], vocab, ns.seed,
                                 cfg["ranged"])
        if cfg["sharegpt"]:
            wls.append(tp.sharegpt_workload(cfg["sharegpt"], vocab, cfg["sharegpt_scale"],
                                            min(2048, llm.engine.max_model_len), ns.seed))
    meta = run_meta("bench throughput", _args_dict(ns))
    try:
        body = tp.run_throughput(llm, wls, policies, cfg["max_num_seqs"], limits, ns.calibrate_repeats,
                                 ns.tile_size, progress=not ns.no_progress, repeats=ns.repeats)
    finally:
        llm.close()  # writes --trace: every policy's steps, reconfigurations marked
    data = {"meta": {**meta, "loadavg_end": loadavg()}, "limits": limits, **body}
    from sarathi.bench.plots import plot_throughput

    return _report(ns, data, "throughput", tp.table(data["results"]), threads, plot_throughput)


def _profile(ns: argparse.Namespace) -> int:
    from sarathi.bench import cost_profile as cp
    from sarathi.bench.common import loadavg, run_meta

    cfg = dict(cp.PRESETS[ns.preset])
    for key in ("prefill_sizes", "decode_batches", "context", "repeats", "mixed_chunk", "mixed_decodes"):
        if getattr(ns, key) is not None:
            cfg[key] = getattr(ns, key)
    llm, limits, threads = _load(ns)
    meta = run_meta("bench profile", _args_dict(ns))
    body = cp.run_profile(llm, cfg["prefill_sizes"], cfg["decode_batches"], cfg["context"], cfg["repeats"],
                          limits, cfg["mixed_chunk"], cfg["mixed_decodes"], progress=not ns.no_progress)
    data = {"meta": {**meta, "loadavg_end": loadavg()}, **body}
    from sarathi.bench.plots import plot_profile

    return _report(ns, data, "profile", "\n".join(cp.summary_lines(data)), threads, plot_profile)


def _report(ns: argparse.Namespace, data: dict, kind: str, summary: str, threads: int,
            plot: Callable[[dict, Path], object]) -> int:
    """Save the result JSON, print the summary and load averages, and draw the plot."""
    from sarathi.bench.common import save_json

    path = save_json(data, ns.out_dir / f"{kind}_{ns.tag or ns.preset}.json")
    meta = data["meta"]
    print(summary)
    print(f"\nthreads {threads}, load avg {meta['loadavg_start']} -> {meta['loadavg_end']}; saved {path}")
    if not ns.no_plot:
        print(f"plot: {plot(data, path.with_suffix('.png'))}")
    return 0


def _serve(ns: argparse.Namespace) -> int:
    from sarathi.bench import serve

    serve.run(ns)
    return 0


def _compare(ns: argparse.Namespace) -> int:
    from sarathi.bench import compare

    compare.run(ns.files, ns.out, ns.workload)
    return 0


def _workload(ns: argparse.Namespace) -> int:
    from sarathi.bench import workloads as w

    if ns.kind == "fixed":
        reqs = w.fixed(ns.input_len, ns.output_len, ns.num_prompts, ns.vocab_size, ns.seed)
    elif ns.kind == "ranged":
        lo = lambda x: max(1, int(x * (1 - ns.range_ratio)))  # noqa: E731
        hi = lambda x: max(1, int(x * (1 + ns.range_ratio)))  # noqa: E731
        reqs = w.ranged((lo(ns.input_len), hi(ns.input_len)), (lo(ns.output_len), hi(ns.output_len)),
                        ns.num_prompts, ns.vocab_size, ns.seed)
    else:
        reqs = w.sharegpt_like(ns.num_prompts, ns.vocab_size, ns.seed, max_len=ns.max_len, scale=ns.scale)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    w.save_workload(reqs, ns.out)
    print(f"{ns.out}: {w.summarize(reqs)}")
    return 0


def add_bench_parser(sub: Any, handlers: dict[str, Handler]) -> None:
    """Register ``sarathi bench <command>`` on the top-level subparsers."""
    bench = sub.add_parser("bench", help="benchmarks: throughput, profile, serve, soak, compare, workload")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    commands: dict[str, Handler] = {}

    t = bsub.add_parser("throughput", help="offline throughput of every policy on one loaded model")
    t.add_argument("--preset", choices=["quick", "full"], default="quick")
    t.add_argument("--policies", nargs="+", default=["sarathi", "vllm", "orca", "request_level"])
    t.add_argument("--chunk-sizes", dest="chunk_sizes", type=int, nargs="+", default=None)
    t.add_argument("--prompt-lens", dest="prompt_lens", type=int, nargs="+", default=None, help="P values")
    t.add_argument("--pd", dest="pd_ratios", type=float, nargs="+", default=None, help="P:D ratios")
    t.add_argument("--num-requests", type=int, default=None)
    t.add_argument("--max-num-seqs", type=int, default=None, help="the fixed batch size B")
    t.add_argument("--ranged", action=argparse.BooleanOptionalAction, default=None,
                   help="add P, D uniform in +-50%% workloads")
    t.add_argument("--sharegpt", type=int, default=None,
                   help="requests in the ShareGPT-like workload (0: none)")
    t.add_argument("--sharegpt-scale", type=float, default=None,
                   help="length multiplier (quick 1/16, full 1/8)")
    t.add_argument("--workload-file", nargs="+", default=None, help="run these workload JSONs instead")
    t.add_argument("--tile-size", type=int, default=None, help="sarathi: round budget to GEMM tiles")
    t.add_argument("--calibrate-repeats", type=int, default=3,
                   help="prefill cost model runs per point (0: token-share split instead)")

    t.add_argument("--repeats", type=int, default=1,
                   help="runs per policy, in alternating order; the median run is reported")
    t.add_argument("--seed", type=int, default=0)
    _common(t, "throughput", ("model", "dtype", "trace"))
    commands["throughput"] = _throughput

    p = bsub.add_parser("profile", help="cost per token of prefill vs decode, op split, roofline ridge")
    p.add_argument("--preset", choices=["quick", "full"], default="quick")
    p.add_argument("--prefill-sizes", type=int, nargs="+", default=None)
    p.add_argument("--decode-batches", type=int, nargs="+", default=None)
    p.add_argument("--context", type=int, default=None, help="KV tokens each decode attends to (512)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--mixed-chunk", type=int, default=None, help="decode-maximal: chunk size C")
    p.add_argument("--mixed-decodes", type=int, nargs="+", default=None, help="decode-maximal: k values")
    _common(p, "profile")
    commands["profile"] = _profile

    from sarathi.bench.serve import add_arguments

    s = bsub.add_parser("serve", help="online latency benchmark of a running OpenAI-compatible server")
    add_arguments(s)
    commands["serve"] = _serve

    from sarathi.bench import soak

    k = bsub.add_parser("soak", help="many random requests under KV pressure: nothing lost or leaked")
    soak.add_arguments(k)
    commands["soak"] = soak.run

    from sarathi.bench import prefix

    pc = bsub.add_parser("prefix", help="automatic prefix caching on vs off: multi-turn chats with a shared "
                         "system prompt, and a no-reuse workload")
    prefix.add_arguments(pc)
    commands["prefix"] = prefix.run

    from sarathi.bench import pipeline as pipe

    pl = bsub.add_parser("pipeline", help="pipeline bubbles per policy: PP=2 (one thread per rank) vs PP=1, "
                                          "traces and timeline plot")
    pipe.add_arguments(pl)
    commands["pipeline"] = pipe.run

    c = bsub.add_parser("compare", help="merge sarathi / peer / serve result JSONs into one table")
    c.add_argument("files", nargs="+")
    c.add_argument("--workload", default=None, help="only this sarathi workload name")
    c.add_argument("--out", type=Path, default=None, help="merged JSON (a .md table is written beside it)")
    commands["compare"] = _compare

    w = bsub.add_parser("workload", help="write a workload JSON (shared by sarathi and the peer scripts)")
    w.add_argument("--kind", choices=["fixed", "ranged", "sharegpt"], default="fixed")
    w.add_argument("--input-len", type=int, default=256)
    w.add_argument("--output-len", type=int, default=32)
    w.add_argument("--range-ratio", type=float, default=0.5)
    w.add_argument("--num-prompts", type=int, default=16)
    w.add_argument("--max-len", type=int, default=2048)
    w.add_argument("--scale", type=float, default=0.125, help="sharegpt length multiplier")
    w.add_argument("--vocab-size", type=int, default=49152)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--out", type=Path, required=True)
    commands["workload"] = _workload

    handlers["bench"] = lambda ns: _run(commands[ns.bench_command], ns)


def _run(command: Handler, ns: argparse.Namespace) -> int:
    """Run a bench command; the benchmarks' own dependencies (httpx, matplotlib) are an extra."""
    try:
        return command(ns)
    except ModuleNotFoundError as e:
        if e.name not in ("httpx", "matplotlib"):
            raise
        raise SystemExit(f"sarathi bench {ns.bench_command} needs {e.name}: pip install 'sarathi[bench]' "
                         "(or bash scripts/setup.sh --test)") from None
