"""Per-token overhead of structured outputs: ``python -m sarathi.structured.bench [--requests 8]``.

Runs the same batch of decodes unconstrained and constrained (a JSON schema whose string must be long,
so no request finishes early), alternating A/B rounds against noise, and reports the median time of
a pure-decode step of each, plus the two parts that structured outputs add: filling the matchers'
masks on the scheduler side and applying them in the sampler.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

SCHEMA = {"type": "object", "required": ["story"],
          "properties": {"story": {"type": "string", "minLength": 1000}}}


def _timed(owner: Any, name: str, bucket: list[float]) -> Any:
    real = getattr(owner, name)

    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            bucket.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)
    return real


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    import sarathi.structured as structured_mod
    from sarathi import LLM, SamplingParams
    from sarathi.sampling_params import StructuredOutputsParams
    from sarathi.structured import backend

    kw = {"device": args.device} if args.device else {}
    llm = LLM(dtype=args.dtype, kv_cache_memory="256MiB", **kw)
    prompts = [f"Story number {i}. Write it as JSON." for i in range(args.requests)]
    so = StructuredOutputsParams(json=SCHEMA)

    def params(constrained: bool) -> list[SamplingParams]:
        return [SamplingParams(temperature=0.8, seed=i, max_tokens=args.tokens, ignore_eos=True,
                               structured_outputs=so if constrained else None) for i in range(args.requests)]

    fills: list[float] = []
    applies: list[float] = []
    accepts: list[float] = []
    _timed(backend.GrammarState, "next_mask", fills)
    _timed(backend.GrammarState, "accept", accepts)
    real_apply = structured_mod.apply_bitmasks
    structured_mod.apply_bitmasks = lambda *a: _time_call(real_apply, applies, *a)
    llm.generate(prompts[:1], params(True)[:1], use_tqdm=False)  # compile + warm up
    steps: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for constrained in (False, True):
            before = len(llm.engine.stats.steps)
            outs = llm.generate(prompts, params(constrained), use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == args.tokens for o in outs)
            recs = list(llm.engine.stats.steps)[before:]
            steps[constrained] += [r.duration for r in recs
                                   if r.num_prompt_tokens == 0 and r.num_decode_tokens == args.requests]
    base, cons = statistics.median(steps[False]), statistics.median(steps[True])
    fill, apply = statistics.median(fills) * args.requests, statistics.median(applies)
    accept = statistics.median(accepts) * args.requests
    print(f"device {llm.engine.executor.device}, {args.requests} requests, "
          f"{len(steps[True])} constrained decode steps")
    print(f"decode step, unconstrained: {base * 1e3:.2f} ms  constrained: {cons * 1e3:.2f} ms  "
          f"overhead: {(cons - base) * 1e3:.2f} ms/step = {(cons - base) / args.requests * 1e6:.0f} us/token "
          f"({(cons / base - 1) * 100:+.1f}%)")
    print(f"  of which: fill masks {fill * 1e3:.3f} ms/step ({fill / args.requests * 1e6:.0f} us/token), "
          f"apply masks {apply * 1e3:.3f} ms/step, accept tokens {accept * 1e3:.3f} ms/step")


def _time_call(fn: Any, bucket: list[float], *a: Any) -> Any:
    t0 = time.perf_counter()
    try:
        return fn(*a)
    finally:
        bucket.append(time.perf_counter() - t0)


if __name__ == "__main__":
    main()
