"""Calibrate the simulator on this machine and validate it against the real engine.

1. ``profile_local``: GEMM peak + bandwidth, probe batches of the default model, fit -> the ``local``
   hardware spec (saved to the cache, and to ``--out-dir``).
2. ``validate``: a mixed offline workload (ShareGPT-like lengths, scaled down) through the real engine
   with the sarathi policy; every step's time predicted from its plan; median and p90 relative error.
3. ``staircase``: prefill-only step time against chunk size, measured and predicted.

    .venv/bin/python scripts/sim_calibrate.py [--threads 1] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sarathi.bench.common import cpu_info, loadavg, save_json
from sarathi.sim import calibrate
from sarathi.sim import workload as wl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--reuse-profile", action="store_true", help="validate the cached `local` spec as it is")
    ns = ap.parse_args()
    from sarathi.llm import LLM
    from sarathi.sim.hardware import get_hardware

    load0 = loadavg()
    engine = LLM(kv_cache_memory="64MiB", threads=ns.threads).engine
    if ns.reuse_profile:
        spec = get_hardware("local")
    else:
        spec, path = calibrate.profile_local(engine, threads=ns.threads)
        print(f"local spec saved to {path}")
    print(f"fit median relative error {spec.measured['fit_median_rel_error']:.3f}, tile {spec.tile}")
    reqs = wl.sharegpt(ns.num_requests, seed=3, max_len=1024, scale=1 / 8)
    lens = ([r.prompt_len for r in reqs], [r.max_tokens for r in reqs])
    val = calibrate.validate(engine, spec, *lens, chunk_size=ns.chunk_size)
    # The noise floor: the same workload again. Scheduling is deterministic, so step i is the same plan
    # in both runs, and their disagreement is what a shared machine alone does to one step's time.
    again = calibrate.validate(engine, spec, *lens, chunk_size=ns.chunk_size)
    val["noise_floor"] = calibrate.compare_runs(val["steps"], again["steps"])
    sizes = list(range(16, 257, 16)) + [320, 384, 512]
    stairs = calibrate.staircase(engine, spec, sizes)
    data = {"cpu": cpu_info(), "threads": ns.threads, "loadavg": [load0, loadavg()], "spec": spec.to_json(),
            "workload": wl.summarize(reqs), "chunk_size": ns.chunk_size, "validation": val,
            "staircase": stairs}
    out = save_json(data, ns.out_dir / "sim_calibration.json")
    print(json.dumps({k: v for k, v in val.items() if k != "steps"}, indent=2))
    print("tokens | measured ms | predicted ms")
    for s in stairs:
        print(f"{s['tokens']} | {s['measured_ms']:.1f} | {s['predicted_ms']:.1f}")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
