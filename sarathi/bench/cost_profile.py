"""``sarathi bench profile``: the paper's cost-per-token picture on this machine.

- Prefill: one prompt chunk of N tokens (no cached prefix), N = 16 ... 1024.
- Decode: a batch of B single-token decodes, each attending to a fixed context, B = 1 ... 64.
- Decode-maximal: a chunk of C - k prompt tokens plus k piggybacked decodes, against the same chunk
  alone and the k decodes alone (the paper's 1021 + 3 example), giving the marginal decode cost.

Each point is the best of ``repeats`` runs of ``engine.executor.execute`` on a hand-made batch
(:mod:`sarathi.bench.probe`), split into linear / attention / other by ``torch.profiler`` op groups.
Limits (GEMM peak, memory bandwidth) are measured in the same process, so the roofline and the ridge
(the decode batch at which decodes stop being memory-bound) use this machine's numbers right now.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sarathi.bench import roofline
from sarathi.bench.common import dtype_name, fmt, loadavg, model_shape
from sarathi.bench.probe import BatchProbe, BatchSpec, timed_split

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"prefill_sizes": [16, 64, 256, 512], "decode_batches": [1, 4, 16, 64], "context": 512,
              "repeats": 2, "mixed_chunk": 256, "mixed_decodes": [1, 7]},
    "full": {"prefill_sizes": [16, 32, 64, 128, 256, 512, 1024], "decode_batches": [1, 2, 4, 8, 16, 32, 64],
             "context": 512, "repeats": 3, "mixed_chunk": 256, "mixed_decodes": [1, 3, 7, 15]},
}


def _roofline_fields(row: dict[str, Any], flops: float, nbytes: float, limits: dict[str, Any] | None,
                     dtype: str) -> None:
    sec = row["time_ms"] / 1000.0
    row.update({"flops": flops, "min_bytes": nbytes, "intensity": flops / nbytes, "gflops": flops / sec / 1e9,
                "gbs": nbytes / sec / 1e9})
    if limits:
        peak = limits["gemm_gflops"].get(dtype) or limits["gemm_gflops"]["float32"]
        row["mfu"] = roofline.mfu(flops, sec, peak)
        row["bw_util"] = roofline.bandwidth_utilisation(nbytes, sec, limits["mem_bw_gbs"])


def predicted_ridge_batch(shape: roofline.LlamaShape, context: int, ridge: float, dtype: str) -> float | None:
    """Smallest decode batch whose intensity ``b F / (W + b KV)`` reaches ``ridge`` FLOP/byte
    (``None`` if the KV reads alone keep it below the ridge at any batch)."""
    f_tok = roofline.model_flops_per_token(shape, context)
    kv_tok = roofline.kv_cache_bytes(shape, context, dtype)
    weights = roofline.model_bytes(shape, dtype)
    if f_tok <= ridge * kv_tok:
        return None
    return ridge * weights / (f_tok - ridge * kv_tok)


def run_profile(llm: Any, prefill_sizes: Sequence[int], decode_batches: Sequence[int], context: int,
                repeats: int, limits: dict[str, Any] | None, mixed_chunk: int | None = 256,
                mixed_decodes: Sequence[int] = (1, 7), progress: bool = True) -> dict[str, Any]:
    """Measure every point; returns the profile JSON body (without ``meta``)."""
    from tqdm.auto import tqdm

    eng = llm.engine
    shape, dtype = model_shape(eng), dtype_name(eng)
    need = max([*prefill_sizes, (mixed_chunk or 0) + max(mixed_decodes or [0]) * context,
                max(decode_batches) * context])
    probe = BatchProbe(eng, max_kv_tokens=need + 64)
    probe.time(BatchSpec(chunks=[(min(prefill_sizes), 0)], decodes=[context]), repeats=1)  # warm-up
    mixed = [k for k in mixed_decodes if mixed_chunk and k < mixed_chunk]
    bar = tqdm(total=len(prefill_sizes) + len(decode_batches) + 3 * len(mixed), desc="profile",
               disable=not progress)
    pre = []
    for n in prefill_sizes:
        row = timed_split(probe, BatchSpec(chunks=[(n, 0)]), repeats)
        row["ms_per_token"] = row["time_ms"] / n
        nbytes = roofline.model_bytes(shape, dtype) + roofline.kv_cache_bytes(shape, n, dtype)
        _roofline_fields(row, roofline.prefill_flops(shape, n), nbytes, limits, dtype)
        row["loadavg"] = loadavg()
        pre.append(row)
        bar.update(1)
    best_prefill = min(r["ms_per_token"] for r in pre)
    dec = []
    for b in decode_batches:
        ctxs = [context] * b
        row = timed_split(probe, BatchSpec(decodes=ctxs), repeats)
        row["ms_per_token"] = row["time_ms"] / b
        row["decode_over_best_prefill"] = row["ms_per_token"] / best_prefill
        _roofline_fields(row, roofline.decode_flops(shape, ctxs), roofline.decode_bytes(shape, ctxs, dtype),
                         limits, dtype)
        row["loadavg"] = loadavg()
        dec.append(row)
        bar.update(1)
    mix_rows = []
    for k in mixed:
        ctxs = [context] * k
        t_mix = min(probe.time(BatchSpec(chunks=[(mixed_chunk - k, 0)], decodes=ctxs), repeats)) * 1e3
        bar.update(1)
        t_pre = min(probe.time(BatchSpec(chunks=[(mixed_chunk - k, 0)]), repeats)) * 1e3
        bar.update(1)
        t_dec = min(probe.time(BatchSpec(decodes=ctxs), repeats)) * 1e3
        bar.update(1)
        marginal = max(0.0, t_mix - t_pre) / k
        mix_rows.append({
            "chunk": mixed_chunk, "prompt_tokens": mixed_chunk - k, "decodes": k, "mixed_ms": t_mix,
            "prefill_only_ms": t_pre, "decode_only_ms": t_dec, "decode_only_ms_per_token": t_dec / k,
            "piggybacked_ms_per_decode": marginal,
            "decode_cost_reduction": (t_dec / k) / marginal if marginal > 0 else None,
            "loadavg": loadavg()})
    bar.close()
    out: dict[str, Any] = {"dtype": dtype, "decode_context": context, "repeats": repeats, "prefill": pre,
                           "decode": dec, "decode_maximal": mix_rows, "limits": limits,
                           "split_method": "torch.profiler aten-op groups (see sarathi/bench/probe.py)"}
    out["ridge"] = ridge_summary(shape, context, dtype, dec, limits)
    return out


def ridge_summary(shape: roofline.LlamaShape, context: int, dtype: str, dec: Sequence[dict[str, Any]],
                  limits: dict[str, Any] | None) -> dict[str, Any]:
    """Where decodes stop being memory-bound: predicted from the roofline, and seen in the timings
    (first batch whose step costs at least twice the batch-1 step, i.e. the fixed weight-read
    cost no longer dominates)."""
    base = next((r for r in dec if r["num_decode_tokens"] == 1), dec[0] if dec else None)
    knee = next((r["num_decode_tokens"] for r in dec if base and r["time_ms"] >= 2 * base["time_ms"]), None)
    out: dict[str, Any] = {"measured_knee_batch": knee,
                           "knee_rule": "first batch with step time >= 2x batch 1"}
    if limits:
        peak = limits["gemm_gflops"].get(dtype) or limits["gemm_gflops"]["float32"]
        ridge = roofline.ridge_point(peak, limits["mem_bw_gbs"])
        out.update({"ridge_flop_per_byte": ridge,
                    "predicted_ridge_batch": predicted_ridge_batch(shape, context, ridge, dtype),
                    # the linear layers alone (no KV reads): where weight reads stop dominating
                    "predicted_ridge_batch_weights_only": predicted_ridge_batch(shape, 0, ridge, dtype)})
    return out


def summary_lines(data: dict[str, Any]) -> list[str]:
    """Short human-readable summary of a profile result."""
    lines = ["prefill chunk | ms/token | linear | attention | other | MFU",
             "---|---|---|---|---|---"]
    for r in data["prefill"]:
        n = r["num_prompt_tokens"]
        lines.append(f"{n} | {r['ms_per_token']:.3f} | {r.get('linear_ms', 0) / n:.3f} | "
                     f"{r.get('attention_ms', 0) / n:.3f} | {r.get('other_ms', 0) / n:.3f} | "
                     f"{r.get('mfu', 0):.2f}")
    lines += ["", f"decode batch (context {data['decode_context']}) | ms/token | x best prefill | linear | "
              "attention | other | BW util", "---|---|---|---|---|---|---"]
    for r in data["decode"]:
        b = r["num_decode_tokens"]
        lines.append(f"{b} | {r['ms_per_token']:.2f} | {r['decode_over_best_prefill']:.1f} | "
                     f"{r.get('linear_ms', 0) / b:.2f} | {r.get('attention_ms', 0) / b:.2f} | "
                     f"{r.get('other_ms', 0) / b:.2f} | {r.get('bw_util', 0):.2f}")
    if data["decode_maximal"]:
        lines += ["", "chunk + k decodes | mixed ms | chunk alone ms | k decodes alone ms | "
                  "ms/decode alone | ms/decode piggybacked", "---|---|---|---|---|---"]
        for m in data["decode_maximal"]:
            lines.append(f"{m['prompt_tokens']} + {m['decodes']} | {m['mixed_ms']:.1f} | "
                         f"{m['prefill_only_ms']:.1f} | {m['decode_only_ms']:.1f} | "
                         f"{m['decode_only_ms_per_token']:.1f} | "
                         f"{m['piggybacked_ms_per_decode']:.2f}")
    r = data["ridge"]
    lines += ["", f"ridge: {fmt(r.get('ridge_flop_per_byte'))} FLOP/byte; predicted decode batch at context "
              f"{data['decode_context']}: {fmt(r.get('predicted_ridge_batch'))} (weights only: "
              f"{fmt(r.get('predicted_ridge_batch_weights_only'))}); measured knee batch "
              f"{r['measured_knee_batch']} ({r['knee_rule']})"]
    return lines
