"""``sarathi bench pipeline``: pipeline bubbles of each policy, PP=2 (one thread per rank) vs PP=1.

One workload (random prompt ids, fixed prompt and output lengths, ``ignore_eos``) runs under every
policy on a PP=2 engine and on a PP=1 reference engine (both with one torch thread per rank, so on a
2-core machine the two stages really run side by side). Reported per policy: throughput, per-stage
compute / communication / idle seconds and bubble fraction (idle / wall time while work was in flight),
the pipeline's total bubble time, and each baseline's bubble time relative to sarathi's (the reduction
ratio). Every stage's busy intervals are saved as a Chrome / Perfetto trace per policy, and a PNG draws
the sarathi timeline above the first baseline's.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

# A paper-like mixed workload: P:D = 32 and a chunk small enough that every chunk can carry all B - 1
# running decodes (SARATHI's condition C <= P (B - 1) / D: 128 <= 224), so micro-batches stay uniform.
DEFAULTS = dict(num_requests=16, prompt_len=512, output_len=16, max_num_seqs=8, chunk_size=128)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sarathi.config import EngineArgs

    EngineArgs.add_cli_args(p, only=("model", "dtype", "trace"))
    p.add_argument("--policies", nargs="+", default=["sarathi", "vllm", "orca"])
    p.add_argument("--num-requests", type=int, default=DEFAULTS["num_requests"])
    p.add_argument("--prompt-len", type=int, default=DEFAULTS["prompt_len"])
    p.add_argument("--output-len", type=int, default=DEFAULTS["output_len"])
    p.add_argument("--max-num-seqs", type=int, default=DEFAULTS["max_num_seqs"], help="batch size B")
    p.add_argument("--chunk-size", type=int, default=DEFAULTS["chunk_size"], help="sarathi token budget")
    p.add_argument("--pp", type=int, default=2, help="pipeline stages of the measured engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="cpu", help="file name suffix: pipeline_<tag>.json")
    p.add_argument("--no-plot", action="store_true")


def _workload(ns: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(ns.seed)
    return [[rng.randrange(100, vocab) for _ in range(ns.prompt_len)] for _ in range(ns.num_requests)]


def _run_policy(llm: Any, policy: str, prompts: list[list[int]], ns: argparse.Namespace) -> dict[str, Any]:
    from sarathi import SamplingParams

    eng = llm.engine
    eng.reconfigure(scheduler=policy, max_num_seqs=ns.max_num_seqs,
                    chunk_size=ns.chunk_size if policy == "sarathi" else None)
    params = SamplingParams(temperature=0.0, max_tokens=ns.output_len, ignore_eos=True)
    n_before = eng.stats.num_steps
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    steps = list(eng.stats.steps)[n_before - eng.stats.num_steps:] if eng.stats.num_steps > n_before else []
    tokens = sum(len(ids) for ids in prompts) + sum(len(o.outputs[0].token_ids) for o in outs)
    row: dict[str, Any] = {"policy": policy, "wall_s": wall, "tokens_per_s": tokens / wall,
                           "output_tokens_per_s": ns.output_len * len(prompts) / wall, "steps": len(steps)}
    ex = eng.executor
    rep = eng.stats.bubbles
    if rep is not None:
        from sarathi.trace import chrome_trace

        row["bubble_s"] = rep["bubble_s"]
        row["pending_s"] = rep["pending_s"]
        row["stages"] = rep["stages"]
        row["trace"] = chrome_trace(list(ex.stats.recent), name=f"PP={ex.world} {policy}")
    else:  # PP=1: one track from the engine's step records
        base = steps[0].start if steps else 0.0
        row["trace"] = [{"ph": "X", "pid": 0, "tid": 0, "cat": "compute", "name": f"step {s.step}",
                         "ts": (s.start - base) * 1e6, "dur": s.duration * 1e6,
                         "args": {"prompt_tokens": s.num_prompt_tokens, "decode_tokens": s.num_decode_tokens}}
                        for s in steps]
    return row


def _trace_path(trace: str | None, pp: int, measured: int) -> str | None:
    """``--trace FILE`` is the measured engine's whole run (all policies); the reference engine's goes
    beside it as ``FILE_pp1.json``."""
    if not trace or pp == measured:
        return trace
    path = Path(trace)
    return str(path.with_name(f"{path.stem}_pp{pp}{path.suffix or '.json'}"))


def run(ns: argparse.Namespace) -> int:
    from sarathi.bench.common import loadavg, markdown_table, run_meta, save_json
    from sarathi.llm import LLM

    meta = run_meta("bench pipeline", {k: str(v) for k, v in vars(ns).items()
                                       if k not in ("command", "bench_command")})
    results: dict[str, list[dict[str, Any]]] = {}
    for pp in (ns.pp, 1):
        llm = LLM(model=ns.model, dtype=ns.dtype, kv_cache_memory="256MiB", pipeline_parallel_size=pp,
                  threads=1, trace=_trace_path(ns.trace, pp, ns.pp))
        try:
            prompts = _workload(ns, llm.engine.model_config.vocab_size)
            # Warm-up (first-touch of the KV cache, oneDNN kernels): otherwise the first policy pays it.
            from sarathi import SamplingParams

            llm.generate([{"prompt_token_ids": ids} for ids in prompts[:2]],
                         SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
            results[f"pp{pp}"] = [_run_policy(llm, pol, prompts, ns) for pol in ns.policies]
        finally:
            llm.close()  # stops the ranks, writes --trace
    pp_rows = results[f"pp{ns.pp}"]
    ref = {r["policy"]: r for r in results["pp1"]}
    sar = next((r for r in pp_rows if r["policy"] == "sarathi"), None)
    table = []
    for r in pp_rows:
        row = {"policy": r["policy"], "tps": r["tokens_per_s"], "tps1": ref[r["policy"]]["tokens_per_s"],
               "bubble": r["bubble_s"]}
        for s in r["stages"]:
            row[f"bf{s['stage']}"] = s["bubble_fraction"]
        row["ratio"] = r["bubble_s"] / sar["bubble_s"] if sar and sar["bubble_s"] else None
        table.append(row)
    cols = [("policy", "policy"), ("tps", f"tok/s PP={ns.pp}"), ("tps1", "tok/s PP=1"),
            ("bubble", "bubble s")] + [(f"bf{i}", f"bubble frac stage {i}") for i in range(ns.pp)] + [
            ("ratio", "bubble vs sarathi")]
    summary = markdown_table(table, cols, digits=3)
    traces = {}
    for key, rows in results.items():
        for r in rows:
            path = ns.out_dir / f"pipeline_{ns.tag}_trace_{key}_{r['policy']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"traceEvents": r.pop("trace"), "displayTimeUnit": "ms"}))
            traces[f"{key}/{r['policy']}"] = str(path)
    data = {"meta": {**meta, "loadavg_end": loadavg()}, "config": {k: getattr(ns, k) for k in DEFAULTS},
            "results": results, "summary": table, "traces": traces}
    out = save_json(data, ns.out_dir / f"pipeline_{ns.tag}.json")
    print(summary)
    print(f"\nsaved {out}")
    if not ns.no_plot:
        print(f"plot: {plot_timelines(traces, ns, out.with_suffix('.png'))}")
    return 0


def plot_timelines(traces: dict[str, str], ns: argparse.Namespace, path: Path) -> Path:
    """Two traced PP timelines (sarathi and the first baseline), one row per stage, compute vs comm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = [p for p in ns.policies if f"pp{ns.pp}/{p}" in traces][:2]
    fig, axes = plt.subplots(len(pols), 1, figsize=(12, 2.2 * len(pols)), squeeze=False)
    colors = {"prefill": "tab:blue", "decode": "tab:orange", "mixed": "tab:green"}
    for ax, pol in zip(axes[:, 0], pols):
        events = json.loads(Path(traces[f"pp{ns.pp}/{pol}"]).read_text())["traceEvents"]
        for e in events:
            if e.get("ph") != "X":
                continue
            color = "lightgray" if e["cat"] == "comm" else colors[e["name"].split()[0]]
            ax.broken_barh([(e["ts"] / 1e3, e["dur"] / 1e3)], (e["tid"] - 0.4, 0.8), color=color)
        ax.set_yticks(range(ns.pp), [f"stage {i}" for i in range(ns.pp)])
        ax.invert_yaxis()
        ax.set_title(f"PP={ns.pp}, {pol}: compute (blue prefill, orange decode, green mixed), comm gray")
        ax.set_xlabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
