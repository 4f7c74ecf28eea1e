"""Mean engine step time on a fixed greedy workload (used to compare two trees of the engine).

    PYTHONPATH=<tree> python scripts/step_time.py <label>
"""

import json
import random
import statistics
import sys
import time

import torch

from sarathi import LLM, SamplingParams

torch.set_num_threads(1)
llm = LLM(dtype="float32", kv_cache_memory="256MiB", chunk_size=256)
rng = random.Random(0)
prompts = [{"prompt_token_ids": [rng.randrange(100, 49000) for _ in range(200)]} for _ in range(16)]
params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
llm.generate(prompts[:2], params)  # warm up
runs = []
for _ in range(3):
    start = llm.engine.stats.num_steps
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    steps = list(llm.engine.stats.steps)[-(llm.engine.stats.num_steps - start):]
    runs.append({"wall_s": wall, "steps": len(steps),
                 "mean_step_ms": 1000 * statistics.mean(s.duration for s in steps),
                 "decode_only_step_ms": 1000 * statistics.median(s.duration for s in steps
                                                                 if not s.num_prompt_tokens)})
print(json.dumps({"tree": sys.argv[1] if len(sys.argv) > 1 else "", "runs": runs}))
