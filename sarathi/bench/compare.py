"""``sarathi bench compare``: merge result JSONs from sarathi and its peers into one table + JSON.

Accepts, in any order (the kind is detected from the content):

- ``sarathi bench throughput`` results: one row per (workload, policy);
- peer offline results from ``benchmarks/peers/vllm_offline.py`` (``engine: vllm-cpu``) and
  ``hf_static.py`` (``engine: hf-transformers-static``): one row each;
- ``sarathi bench serve`` results: one row per server/rate.

Offline rows get ``x <peer>`` columns: the row's end-to-end throughput over each peer's (same
definition everywhere: (prompt + generated tokens) / wall time of the generate call, model load and
engine start excluded). Serving rows get latency ratios to the first serving row (the baseline).
Ratios are only meaningful between files made on the same machine at the same time, with the same
workload file and thread count: the table repeats each file's load average and threads for that reason.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sarathi.bench.common import markdown_table, run_meta, save_json

SERVE_KEYS = ("p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "p50_e2el_ms", "p99_e2el_ms",
              "mean_tpot_ms", "output_throughput", "request_goodput_tbt", "num_stalls")


def classify(data: dict[str, Any]) -> str:
    """``sarathi`` | ``peer`` | ``serve`` | ``unknown``."""
    command = (data.get("meta") or {}).get("command")
    if isinstance(data.get("results"), list) and command == "bench throughput":
        return "sarathi"
    if "engine" in data and "throughput_tok_s" in data:
        return "peer"
    if "mean_ttft_ms" in data:
        return "serve"
    return "unknown"


def offline_rows(files: Sequence[tuple[str, dict[str, Any]]], workload: str | None) -> list[dict[str, Any]]:
    """Sarathi policy rows (optionally one workload only) followed by one row per peer file."""
    rows = []
    for name, d in files:
        kind = classify(d)
        if kind == "sarathi":
            meta = d.get("meta", {})
            for r in d["results"]:
                if workload is None or r["workload"] == workload:
                    rows.append({"engine": f"sarathi/{r['policy']}", "workload": r["workload"],
                                 "time_s": r["wall_s"], "throughput_tok_s": r["throughput_tok_s"],
                                 "output_throughput_tok_s": r["output_throughput_tok_s"],
                                 "generated_tokens": r["generated_tokens"],
                                 "threads": meta.get("torch_threads"),
                                 "loadavg": (r.get("loadavg_start") or [None])[0], "file": name})
        elif kind == "peer":
            wl = f"file:{Path(str(d['workload'])).stem}" if d.get("workload") else Path(name).stem
            rows.append({"engine": d["engine"], "workload": wl,
                         "time_s": d["total_time_s"], "throughput_tok_s": d["throughput_tok_s"],
                         "output_throughput_tok_s": d["output_throughput_tok_s"],
                         "generated_tokens": d["total_generated_tokens"], "threads": d.get("threads"),
                         "loadavg": (d.get("loadavg_start") or [None])[0], "file": name})
    peers = [r for r in rows if not r["engine"].startswith("sarathi/")]
    for r in rows:
        for p in peers:
            ok = bool(p["throughput_tok_s"])
            r[f"x {p['engine']}"] = r["throughput_tok_s"] / p["throughput_tok_s"] if ok else None
    return rows


def serve_rows(files: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per serving result; ``<metric> ratio`` = row / first row (the baseline)."""
    rows = []
    for name, d in files:
        if classify(d) != "serve":
            continue
        row = {"server": d.get("label") or d.get("model"), "rate": d.get("request_rate"),
               "completed": d.get("completed"), "loadavg": (d.get("loadavg_start") or [None])[0],
               "file": name}

        row.update({k: d.get(k) for k in SERVE_KEYS})
        rows.append(row)
    if rows:
        base = rows[0]
        for r in rows:
            for k in ("p50_ttft_ms", "p99_ttft_ms", "p99_itl_ms", "p99_e2el_ms", "output_throughput"):
                r[f"{k} ratio"] = r[k] / base[k] if r.get(k) and base.get(k) else None
    return rows


def compare(paths: Sequence[str | Path], workload: str | None = None) -> dict[str, Any]:
    """Load every file and build the merged result."""
    files = [(str(p), json.loads(Path(p).read_text())) for p in paths]
    unknown = [n for n, d in files if classify(d) == "unknown"]
    if unknown:
        raise ValueError(f"not a benchmark result: {unknown}")
    return {"meta": run_meta("bench compare", {"files": [n for n, _ in files], "workload": workload}),
            "offline": offline_rows(files, workload), "serve": serve_rows(files)}


def render(data: dict[str, Any]) -> str:
    """Markdown tables for the merged result."""
    out = []
    if data["offline"]:
        ratio_cols = [k for k in data["offline"][0] if k.startswith("x ")]
        cols = [("engine", "engine"), ("workload", "workload"), ("time_s", "time s"),
                ("throughput_tok_s", "e2e tok/s"), ("output_throughput_tok_s", "output tok/s"),
                *[(k, k) for k in ratio_cols], ("threads", "threads"), ("loadavg", "load 1m")]
        rows = [{**r, **{k: f"{r[k]:.2f}" for k in ratio_cols if isinstance(r.get(k), float)}}
                for r in data["offline"]]
        out.append(markdown_table(rows, cols))
    if data["serve"]:
        cols = [("server", "server"), ("rate", "req/s"), ("completed", "done"),
                *[(k, k) for k in SERVE_KEYS], ("p99_ttft_ms ratio", "p99 TTFT ratio"),
                ("p99_itl_ms ratio", "p99 ITL ratio"), ("loadavg", "load 1m")]
        out.append(markdown_table(data["serve"], cols, digits=2))
    return "\n\n".join(out)


def run(paths: Sequence[str | Path], out: str | Path | None, workload: str | None = None) -> dict[str, Any]:
    """CLI body: merge, print, save."""
    data = compare(paths, workload)
    print(render(data))
    if out is not None:
        save_json(data, out)
        Path(out).with_suffix(".md").write_text(render(data) + "\n")
        print(f"\nsaved {out} (+ .md)")
        serve = [(str(d.get("label") or d.get("model")), d)
                 for d in (json.loads(Path(p).read_text()) for p in paths) if classify(d) == "serve"]
        if serve and all(d.get("requests") for _, d in serve):
            from sarathi.bench.plots import plot_serve

            print(f"plot: {plot_serve(serve, Path(out).with_suffix('.png'))}")
    return data
