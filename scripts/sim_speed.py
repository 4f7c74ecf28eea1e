"""How long the simulator takes for the issue's bar: 10,000 requests at paper scale (GPT-3 175B on
TP 8 x PP 8 A100s, lengths 1K-4K Zipf 0.4, P:D 10, chunk 256), all arriving at t = 0.

    .venv/bin/python scripts/sim_speed.py [--num-requests 10000] [--scheduler sarathi]
"""

from __future__ import annotations

import argparse
import json
import time

from sarathi.sim import workload as wl
from sarathi.sim.runner import SimConfig, build_engine, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--scheduler", default="sarathi")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ns = ap.parse_args()
    reqs = wl.zipf(ns.num_requests, 1024, 4096, 10.0, 0.4)
    engine, clock = build_engine(SimConfig(model="gpt3-175b", hardware="a100-80gb", tensor_parallel_size=8,
                                           pipeline_parallel_size=8, scheduler=ns.scheduler, chunk_size=256,
                                           max_num_seqs=ns.max_num_seqs))
    t0 = time.perf_counter()
    m = run(engine, clock, reqs).metrics
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": round(wall, 2), "num_requests": ns.num_requests,
                      "num_steps": m["num_steps"], "steps_per_s": round(m["num_steps"] / wall),
                      "virtual_makespan_s": round(m["makespan_s"], 1),
                      "throughput_tok_s": round(m["throughput_tok_s"]),
                      "bubble_fraction": round(m["bubble_fraction"], 4)}))


if __name__ == "__main__":
    main()
