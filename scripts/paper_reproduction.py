"""Regenerate docs/paper-reproduction.md: the simulator's numbers beside the SARATHI paper's headline
results (Agrawal et al., arXiv 2308.16369), plus this machine's calibration if it has been run.

    .venv/bin/python scripts/paper_reproduction.py [--gpt3-requests 2000] [--out docs/paper-reproduction.md]

Every run is an offline workload (all requests at t = 0, ``ignore_eos``) through the real schedulers on
the simulated executor. Decode throughput counts decode tokens over the time attributed to them: all of
a decode-only step, and the marginal cost of the decodes in a mixed step (exact in a noise-free model).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sarathi.sim import workload as wl
from sarathi.sim.runner import SimConfig, build_engine, run

# (model, hardware, sequence length, B, P:D, paper decode speedup, paper end-to-end gain)
HEADLINE = [
    ("llama-13b", "a6000", 1024, 6, 50, 5.45, 1.33),
    ("llama-13b", "a6000", 2048, 6, 50, 3.26, 1.26),
    ("llama-13b", "a6000", 3072, 6, 50, 2.51, 1.22),
    ("llama-33b", "a100-80gb", 1024, 10, 28, 3.83, 1.25),
    ("llama-33b", "a100-80gb", 2048, 5, 63, 4.25, 1.22),
    ("llama-33b", "a100-80gb", 3072, 3, 127, 3.51, 1.14),
]
BASELINES = ("request_level", "vllm", "orca")
CHUNK = 256


def one(model: str, hw: str, scheduler: str, reqs: list[wl.SimRequest], B: int, chunk: int | None = None,
        tp: int = 1, pp: int = 1) -> dict[str, Any]:
    engine, clock = build_engine(SimConfig(model=model, hardware=hw, scheduler=scheduler,
                                           chunk_size=chunk, max_num_seqs=B, tensor_parallel_size=tp,
                                           pipeline_parallel_size=pp, max_model_len=4096))
    return run(engine, clock, reqs).metrics


def headline(num_batches: int) -> list[dict[str, Any]]:
    rows = []
    for model, hw, seq, B, pd, paper_dec, paper_e2e in HEADLINE:
        d = max(1, round(seq / (pd + 1)))
        reqs = wl.fixed(seq - d, d, B * num_batches)
        res = {s: one(model, hw, s, reqs, B) for s in BASELINES}
        res["sarathi"] = one(model, hw, "sarathi", reqs, B, CHUNK)
        row: dict[str, Any] = {"model": model, "hardware": hw, "seq": seq, "P": seq - d, "D": d, "B": B,
                               "pd": pd, "paper_decode_speedup": paper_dec, "paper_e2e_gain": paper_e2e}
        for s in BASELINES:
            row[f"decode_x_{s}"] = res["sarathi"]["decode_tok_s"] / res[s]["decode_tok_s"]
            row[f"e2e_x_{s}"] = res["sarathi"]["throughput_tok_s"] / res[s]["throughput_tok_s"]
        row["runs"] = res
        rows.append(row)
    return rows


def gpt3(num_requests: int) -> dict[str, Any]:
    reqs = wl.zipf(num_requests, 1024, 4096, 10.0, 0.4)
    out = {}
    for label, sched, chunk in (("orca", "orca", None), ("sarathi", "sarathi", CHUNK)):
        t0 = time.perf_counter()
        m = one("gpt3-175b", "a100-80gb", sched, reqs, 128, chunk, tp=8, pp=8)
        m["wall_s"] = time.perf_counter() - t0
        out[label] = m
    return out


def fmt(x: float | None, d: int = 2) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def calibration_section(path: Path) -> str:
    if not path.exists():
        return ("Not measured in this checkout: run `.venv/bin/python scripts/sim_calibrate.py` (writes "
                f"`{path}`), then this script again.\n")
    c = json.loads(path.read_text())
    v, spec = c["validation"], c["spec"]
    kinds = ", ".join(f"{k} {x['median_rel_error'] * 100:.1f}% over {x['steps']} steps"
                      for k, x in v["by_kind"].items())
    dtype = spec["measured"].get("dtype")
    w = c["workload"]
    lines = [
        f"Machine: {c['cpu']['model']}, {c['threads']} torch thread(s), load average "
        f"{c['loadavg'][0]} -> {c['loadavg'][1]} (shared with other jobs). Model: the default "
        f"SmolLM2-135M ({dtype}).",
        "",
        f"Fitted `local` spec: GEMM peak {spec['peak_flops'].get(dtype, 0) / 1e9:.0f} GFLOP/s, bandwidth "
        f"{spec['mem_bw'] / 1e9:.1f} GB/s, tile {spec['tile']}, linear x{spec['linear_scale']:.2f}, "
        f"attention x{spec['attention_scale']:.2f} of the roofline, overheads "
        f"{spec['step_overhead_s'] * 1e3:.2f} ms/step + {spec['seq_overhead_s'] * 1e6:.0f} us/sequence "
        f"(fit error on the probe batches: median "
        f"{spec['measured']['fit_median_rel_error'] * 100:.1f}%).",
        "",
        f"Validation: the real engine ran {w['num_requests']} requests (ShareGPT-like lengths / 8: median "
        f"prompt {w['median_prompt_len']:.0f}, output {w['median_output_len']:.0f} tokens) with the sarathi "
        f"policy, chunk {c['chunk_size']}; each of its {v['num_steps']} steps was predicted from its plan. "
        f"**Relative error: median {v['median_rel_error'] * 100:.1f}%, p90 {v['p90_rel_error'] * 100:.1f}%** "
        f"(mean signed {v['mean_signed_error'] * 100:+.1f}%; by step kind: {kinds}). Total predicted "
        f"{v['total_predicted_s']:.2f} s vs measured {v['total_measured_s']:.2f} s.",
        "",
    ]
    nf = v.get("noise_floor")
    if nf:
        lines += [
            f"Noise floor: the same workload run again schedules the same steps (deterministic), yet the two "
            f"runs' times for the same step differ by a median {nf['run_to_run_median_rel_diff'] * 100:.1f}% "
            f"(p90 {nf['run_to_run_p90_rel_diff'] * 100:.1f}%) on this shared machine. Against the faster of "
            f"the two runs (the less disturbed one) the model's error is median "
            f"{nf['model_vs_faster_run_median_rel_error'] * 100:.1f}%, p90 "
            f"{nf['model_vs_faster_run_p90_rel_error'] * 100:.1f}%.",
            "",
        ]
    lines += [
        "Tile staircase on this machine (prefill-only step, ms):",
        "",
        "| chunk tokens | measured | model |",
        "|---|---|---|",
    ]
    lines += [f"| {s['tokens']} | {s['measured_ms']:.1f} | {s['predicted_ms']:.1f} |" for s in c["staircase"]]
    return "\n".join(lines) + "\n"


def anchors() -> dict[str, str]:
    """The cost model's LLaMA-13B / A6000 times for the paper's measured cases (ms)."""
    from sarathi.sim.costmodel import CostModel
    from sarathi.sim.models import MODELS

    m = CostModel(MODELS["llama-13b"], "a6000")
    cases = {"anchor_256": m.step([(256, 0)], []), "anchor_257": m.step([(257, 0)], []),
             "anchor_dec": m.step([], [1024] * 4), "anchor_mix": m.step([(1021, 0)], [1024] * 3)}
    return {k: f"{c.total_s * 1e3:.1f}" for k, c in cases.items()}


def staircase_gpu() -> str:
    from sarathi.sim.costmodel import CostModel
    from sarathi.sim.models import MODELS

    m = CostModel(MODELS["llama-13b"], "a6000")
    sizes = [128, 129, 192, 256, 257, 320, 384, 385, 512]
    rows = [f"| {n} | {m.step([(n, 0)], [], 1).total_s * 1e3:.1f} |" for n in sizes]
    return "\n".join(["| chunk tokens | model ms |", "|---|---|", *rows])


def render(rows: list[dict[str, Any]], g: dict[str, Any], num_batches: int, calib: str) -> str:
    t = ["| model / hardware | seq (P+D) | B | P:D | decode speedup: paper | sim vs request-level | "
         "sim vs vllm | sim vs orca | end-to-end: paper | sim vs request-level | sim vs vllm | sim vs orca |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t.append(f"| {r['model']} / {r['hardware']} | {r['seq']} ({r['P']}+{r['D']}) | {r['B']} | "
                 f"{r['pd']} | {r['paper_decode_speedup']:.2f}x | {r['decode_x_request_level']:.2f}x | "
                 f"{r['decode_x_vllm']:.2f}x | {r['decode_x_orca']:.2f}x | {r['paper_e2e_gain']:.2f}x | "
                 f"{r['e2e_x_request_level']:.2f}x | {r['e2e_x_vllm']:.2f}x | {r['e2e_x_orca']:.2f}x |")
    o, s = g["orca"], g["sarathi"]
    r33 = rows[5]["runs"]["sarathi"]  # LLaMA-33B at 3K
    gl = ["| policy | throughput tok/s | bubble fraction | TBT p50 ms | TBT p99 ms | steps | wall s |",
          "|---|---|---|---|---|---|---|"]
    for name, m in (("orca (TP8 x PP8)", o), ("sarathi c256 (TP8 x PP8)", s)):
        gl.append(f"| {name} | {m['throughput_tok_s']:.0f} | {m['bubble_fraction']:.3f} | "
                  f"{fmt(m['tbt_ms_p50'], 1)} | {fmt(m['tbt_ms_p99'], 1)} | {m['num_steps']} | "
                  f"{m['wall_s']:.1f} |")
    return TEMPLATE.format(
        table="\n".join(t), num_batches=num_batches, gpt3_table="\n".join(gl), gpt3_n=o["num_requests"],
        gpt3_e2e=s["throughput_tok_s"] / o["throughput_tok_s"],
        gpt3_bubble=(o["bubble_fraction"] / s["bubble_fraction"]) if s["bubble_fraction"] else float("inf"),
        staircase=staircase_gpu(), calibration=calib, orca_bubble=o["bubble_fraction"],
        sarathi_bubble=s["bubble_fraction"],
        d13=", ".join(f"{r['decode_x_request_level']:.2f}x" for r in rows[:3]),
        e13=", ".join(f"{r['e2e_x_request_level']:.2f}x" for r in rows[:3]),
        d33=", ".join(f"{r['decode_x_request_level']:.2f}x" for r in rows[3:6]),
        e33=", ".join(f"{r['e2e_x_request_level']:.2f}x" for r in rows[3:6]),
        dec_only_33b=100 * r33["steps_decode_only"] / r33["num_steps"], **anchors())


TEMPLATE = """# Reproducing SARATHI's headline results with the simulator

Generated by `scripts/paper_reproduction.py` (do not edit by hand; edit the script and rerun it).
The simulator is the real engine (same scheduler classes, same KV block manager) with the
`simulated` executor: a roofline cost model per step on a hardware spec, advancing a virtual clock
(`sarathi/sim/`, `sarathi/executor/simulated.py`; `sarathi simulate --help`).

## Configurations
- Offline: all requests at t = 0, every request generates exactly D tokens (`ignore_eos`), B requests per
  batch at most (`max_num_seqs`), KV cache sized from device memory (never the limit here), fp16.
- SARATHI: `--scheduler sarathi --chunk-size 256`; the budget counts chunk tokens plus piggybacked decodes,
  so a step holds 256 - (decodes) prompt tokens, as in the paper.
- Baselines: `request_level` (FasterTransformer-style static batches: one prefill-only step, then
  decode-only steps until the whole batch is done; the paper's baseline), `vllm` (prefill-first
  iteration-level batching) and `orca` (iteration-level, whole prompts batched with decodes).
- {num_batches} batches' worth of requests (B x {num_batches}) per row.
- Models: `llama-13b` (LLaMA-13B shape), `llama-33b` (LLaMA-33B shape, context raised to 4K because the
  paper runs 3K sequences); hardware `a6000` (154.8 TFLOP/s fp16, 768 GB/s) and `a100-80gb` (312 TFLOP/s,
  2039 GB/s), both at 72% of peak FLOP/s and 80% of bandwidth: efficiencies fitted to the paper's own
  LLaMA-13B / A6000 timings (below), not to its end results.

## Anchors: the paper's LLaMA-13B / A6000 kernel timings vs the cost model
| case | paper ms | model ms |
|---|---|---|
| prefill 256 tokens | 69.8 | {anchor_256} |
| prefill 257 tokens (one token past the 128 tile) | 92.3 | {anchor_257} |
| 4 decodes at context 1024 | 49.96 | {anchor_dec} |
| 1021 prompt tokens + 3 decodes | 238.4 | {anchor_mix} |

Tile staircase of the model (LLaMA-13B, A6000, prefill-only step):

{staircase}

## Headline table: decode speedup and end-to-end throughput gain of SARATHI
{table}

## GPT-3 175B on 64 A100s (TP 8 x PP 8), {gpt3_n} requests, 1K-4K tokens Zipf 0.4, P:D 10, B 128
{gpt3_table}

End-to-end gain of SARATHI over Orca: **{gpt3_e2e:.2f}x** (paper: 1.91x with 10K requests); bubble fraction
(idle share of stage time) {gpt3_bubble:.2f}x lower (paper: median bubble time per request 6.29x lower).

## Where and why the numbers differ
- **LLaMA-13B / A6000 decode speedups are close to the paper's** ({d13} vs 5.45x, 3.26x, 2.51x at
  1K, 2K, 3K) and fall with the sequence length for the paper's reason: each piggybacked decode re-reads a
  longer KV cache. End-to-end gains come out higher ({e13} vs 1.33x, 1.26x, 1.22x); a likely reason is
  that the GPU specs charge no per-step host overhead, which many small chunked steps pay more often
  than one large prefill step.
  Run length matters: with only 10 batches of requests
  the final decode-only tail weighs more (the 13B 1K decode speedup is 3.9x with B x 10 requests, 5.6x
  with B x 100), so the table uses B x {num_batches} requests to approach the paper's steady state.
- **The three baselines coincide** on these fixed-length workloads: every request of a batch has the same
  P and D, so `request_level`, `vllm` and `orca` all prefill B prompts together and decode them together
  until they finish at the same step. They differ only where B prompts exceed the 16K-token budget of the
  non-chunking policies (3K sequences), which splits the prefill into two steps.
- **LLaMA-33B / A100 decode speedups are about half the paper's** ({d33} vs 3.83x, 4.25x, 3.51x)
  while the end-to-end gains match ({e33} vs 1.25x, 1.22x, 1.14x). With B = 3 or 5, our scheduler
  admits a new prompt only when a running request finishes (B is the batch limit), so whenever the
  prompt in flight completes while the others still decode, steps run decode-only
  ({dec_only_33b:.0f}% of the steps at 3K) and those decodes pay the full weight read, as in the
  baseline. The paper's analysis assumes every iteration carries a prompt chunk beside B - 1 decodes;
  the end-to-end number, dominated by prefill, is insensitive to this.
- **GPT-3 175B, TP 8 x PP 8**: SARATHI's gain over Orca is larger here ({gpt3_e2e:.2f}x vs 1.91x). Our
  `orca` puts whole prompts (1K-4K tokens, up to the 16K-token budget) into micro-batches beside decodes, so
  consecutive micro-batches differ in cost by up to two orders of magnitude (bubbles PB1 and PB2): its
  stages idle {orca_bubble:.0%} of the time against {sarathi_bubble:.0%} for SARATHI's equal-sized
  micro-batches. The paper's Orca baseline was tuned (best case) and its bubble metric is the median
  bubble time per request, while we report the idle share of all stage time over the whole run; both say
  that decode-maximal micro-batches remove most bubbles. The default run uses {gpt3_n} requests to keep the
  script short; `--gpt3-requests 10000` runs the paper's size (about two minutes per policy here).
- **What the cost model leaves out**: wave quantization across SMs, attention-kernel variants, CUDA
  graphs and host overheads on GPUs, and communication/compute overlap. Its efficiencies (72% of peak
  FLOP/s, 80% of bandwidth) come from the paper's own LLaMA-13B / A6000 kernel timings (anchors above,
  within 10%), and the other GPUs reuse them, so absolute times elsewhere are roofline estimates.

## Calibration on this machine (the `local` hardware)
{calibration}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-batches", type=int, default=100)
    ap.add_argument("--gpt3-requests", type=int, default=2000)
    ap.add_argument("--calibration", type=Path, default=Path("benchmarks/results/sim_calibration.json"))
    ap.add_argument("--out", type=Path, default=Path("docs/paper-reproduction.md"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/paper_reproduction.json"))
    ns = ap.parse_args()
    rows = headline(ns.num_batches)
    g = gpt3(ns.gpt3_requests)
    text = render(rows, g, ns.num_batches, calibration_section(ns.calibration))
    ns.out.write_text(text)
    from sarathi.bench.common import save_json

    save_json({"headline": rows, "gpt3": g}, ns.json)
    print(text)


if __name__ == "__main__":
    main()
