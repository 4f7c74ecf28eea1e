"""Where a CUDA step's time goes (for sessions lent a GPU): per policy, the wall time of a whole run split
into forward / sampling / metadata building (the rest is the scheduler and Python around them), and
torch.profiler's top ops over a few mixed steps of a second run.

    python3 scripts/gpu_profile.py MODEL_DIR [--requests 128] [--prompt 128] [--output 128] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import torch


class Timed:
    """Wraps ``fn`` so that each call's wall time (after a device sync) adds to ``totals[name]``."""

    def __init__(self, fn: Callable[..., Any], name: str, totals: dict[str, float], sync: Callable[[], None]):
        self.fn, self.name, self.totals, self.sync = fn, name, totals, sync

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.sync()
        t = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.sync()
        self.totals[self.name] = self.totals.get(self.name, 0.0) + time.perf_counter() - t
        return out


def profile_policy(model: str, device: str, policy: str, chunk: int | None, prompts: list[dict[str, Any]],
                   out_len: int) -> None:
    from sarathi import LLM, SamplingParams
    from sarathi.executor import local

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    llm = LLM(model=model, device=device, dtype="bfloat16", scheduler=policy, chunk_size=chunk,
              max_num_seqs=len(prompts), enable_prefix_caching=False)
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    ex, totals = llm.engine.executor, {}
    originals = ex.model, local.sample, ex._metadata
    ex.model = Timed(ex.model, "forward", totals, sync)
    local.sample = Timed(local.sample, "sample", totals, sync)
    ex._metadata = Timed(ex._metadata, "metadata", totals, sync)
    try:
        sync()
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        sync()
        wall = time.perf_counter() - t0
    finally:
        ex.model, local.sample, ex._metadata = originals
    print(policy, chunk, f"wall {wall:.2f}s", {k: round(v, 2) for k, v in totals.items()}, flush=True)
    for i, p in enumerate(prompts):  # a second run, profiled a few steps in (prefill chunks + decodes)
        llm.engine.add_request(f"profiled-{i}", p, sp)
    for _ in range(12):
        llm.engine.step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(6):
            llm.engine.step()
        sync()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18), flush=True)
    if device == "cuda":
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ns = ap.parse_args()
    g = torch.Generator().manual_seed(2)
    prompts = [{"prompt_token_ids": torch.randint(3, 32000, (ns.prompt,), generator=g).tolist()}
               for _ in range(ns.requests)]
    for policy, chunk in (("sarathi", 512), ("vllm", None)):
        profile_policy(ns.model, ns.device, policy, chunk, prompts, ns.output)
        gc.collect()  # a dropped LLM holds reference cycles: free it before the next


if __name__ == "__main__":
    main()
