"""PNG plots for the benchmark JSONs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(meta: dict[str, Any]) -> str:
    cpu = meta.get("cpu", {})
    threads = f"{meta['torch_threads']} torch threads, " if meta.get("torch_threads") else ""
    return f"{cpu.get('model', '?')}, {threads}load avg {meta.get('loadavg_start')}, {meta.get('date', '')}"


def plot_throughput(data: dict[str, Any], path: str | Path) -> Path:
    """Per prompt length: end-to-end and decode throughput vs P:D, one line per policy; other
    workloads (ranged, ShareGPT-like, files) as grouped bars of end-to-end throughput."""
    plt = _plt()
    res = data["results"]
    sweeps = sorted({w["P"] for w in data["workloads"] if w["kind"] == "fixed"})
    others = [w["name"] for w in data["workloads"] if w["kind"] != "fixed"]
    policies = data["policies"]
    nrows = len(sweeps) + (1 if others else 0)
    fig, axes = plt.subplots(nrows, 2, figsize=(12, 3.6 * nrows), squeeze=False)
    for row, P in enumerate(sweeps):
        names = {w["name"]: w["pd"] for w in data["workloads"] if w["kind"] == "fixed" and w["P"] == P}
        for col, (key, label) in enumerate((("throughput_tok_s", "end-to-end tokens/s"),
                                            ("decode_tok_s", "decode tokens/s (attributed)"))):
            ax = axes[row][col]
            for pol in policies:
                pts = sorted((names[r["workload"]], r[key]) for r in res
                             if r["policy"] == pol and r["workload"] in names and r.get(key))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=pol)
            ax.set_xscale("log")
            pds = sorted(set(names.values()))
            ax.set_xticks(pds, [f"{v:g}" for v in pds])
            ax.minorticks_off()
            ax.set_xlabel("P:D (prompt tokens per decode token)")
            ax.set_ylabel(label)
            ax.set_title(f"P = {P}, B = {data['max_num_seqs']}")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    if others:
        for col, key in enumerate(("throughput_tok_s", "decode_tok_s")):
            ax = axes[-1][col]
            width = 0.8 / max(1, len(policies))
            x = np.arange(len(others))
            for i, pol in enumerate(policies):
                by_wl = {r["workload"]: r.get(key) or 0.0 for r in res if r["policy"] == pol}
                vals = [by_wl.get(w, 0.0) for w in others]

                ax.bar(x + i * width, vals, width, label=pol)
            ax.set_xticks(x + width * (len(policies) - 1) / 2, others, fontsize=8)
            e2e = key == "throughput_tok_s"
            ax.set_ylabel("end-to-end tokens/s" if e2e else "decode tokens/s (attributed)")
            ax.grid(alpha=0.3, axis="y")
        axes[-1][0].legend(fontsize=8)
    fig.suptitle("Offline throughput by policy\n" + _subtitle(data.get("meta", {})), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _stack(ax: Any, labels: Sequence[str], rows: Sequence[dict[str, Any]], per: Sequence[int],
           title: str, xlabel: str) -> None:
    bottom = np.zeros(len(rows))
    x = np.arange(len(rows))
    for cat, color in (("linear", "tab:blue"), ("attention", "tab:orange"), ("other", "tab:gray")):
        vals = np.array([r.get(f"{cat}_ms", 0.0) / n for r, n in zip(rows, per)])
        ax.bar(x, vals, bottom=bottom, label=cat, color=color)
        bottom += vals
    ax.set_xticks(x, labels)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ms per token")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def plot_profile(data: dict[str, Any], path: str | Path) -> Path:
    """Cost per token of prefill vs decode, the linear/attention/other split, and the roofline."""
    plt = _plt()
    pre, dec = data["prefill"], data["decode"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0][0]
    ax.plot([r["num_prompt_tokens"] for r in pre], [r["ms_per_token"] for r in pre], "o-",
            label="prefill: chunk of N tokens")
    ax.plot([r["num_decode_tokens"] for r in dec], [r["ms_per_token"] for r in dec], "s-",
            label=f"decode: batch of N (context {data['decode_context']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the step (N)")
    ax.set_ylabel("ms per token")
    ax.set_title("Time per token")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _stack(axes[0][1], [str(r["num_prompt_tokens"]) for r in pre], pre, [r["num_prompt_tokens"] for r in pre],
           "Prefill split", "prompt chunk tokens")
    _stack(axes[1][0], [str(r["num_decode_tokens"]) for r in dec], dec, [r["num_decode_tokens"] for r in dec],
           "Decode split", "decode batch size")
    ax = axes[1][1]
    lim = data.get("limits") or {}
    peak, bw = (lim.get("gemm_gflops") or {}).get(data.get("dtype", "float32")), lim.get("mem_bw_gbs")
    if peak and bw:
        xs = np.logspace(-1, 3, 200)
        ax.plot(xs, np.minimum(peak, xs * bw), "k-", lw=1, label=f"roof: {peak:.0f} GFLOP/s, {bw:.1f} GB/s")
        ax.axvline(peak / bw, color="k", ls=":", lw=1, label=f"ridge {peak / bw:.1f} FLOP/B")
    ax.plot([r["intensity"] for r in pre], [r["gflops"] for r in pre], "o", label="prefill chunks")
    ax.plot([r["intensity"] for r in dec], [r["gflops"] for r in dec], "s", label="decode batches")
    for r in dec:
        ax.annotate(str(r["num_decode_tokens"]), (r["intensity"], r["gflops"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (model FLOPs / minimum bytes)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title("Roofline")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.suptitle("Cost per token, prefill vs decode\n" + _subtitle(data.get("meta", {})), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _cdf(ax: Any, values_ms: Sequence[float], label: str) -> None:
    if not len(values_ms):
        return
    v = np.sort(np.asarray(values_ms, dtype=float))
    ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)


def plot_serve(runs: Sequence[tuple[str, dict[str, Any]]], path: str | Path) -> Path:
    """CDFs of TTFT, ITL and E2EL for one or more serving runs (each needs per-request details)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, m in runs:
        reqs = [r for r in m.get("requests", []) if r.get("success")]
        _cdf(axes[0], [r["ttft"] * 1e3 for r in reqs], label)
        _cdf(axes[1], [g * 1e3 for r in reqs for g in r["itl"]], label)
        _cdf(axes[2], [r["latency"] * 1e3 for r in reqs], label)
    for ax, name in zip(axes, ("TTFT", "ITL / TBT", "E2EL")):
        lo, hi = ax.get_xlim()
        wide = lo > 0 and hi / lo > 30
        if wide:  # stalls: a long tail over orders of magnitude
            ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms{', log scale' if wide else ''})")
        ax.set_ylabel("fraction of " + ("gaps" if name.startswith("ITL") else "requests"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    first = runs[0][1] if runs else {}
    fig.suptitle(f"Serving latency CDFs, rate {first.get('request_rate')} req/s\n"
                 + _subtitle(first.get("meta", {})), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
