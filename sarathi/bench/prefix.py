"""``sarathi bench prefix``: automatic prefix caching on vs off, on one loaded model.

Two workloads, each run with caching off and on (alternating, on one engine: only the flag differs):
- **shared**: ``users`` multi-turn chats that all start with the same system prompt. Each round sends
  every user's next turn at once; a turn's prompt is the system prompt, the user's earlier turns and
  the model's answers, and a new question, so later turns repeat everything before them.
- **no-reuse**: as many requests of random token ids (nothing shared), to measure what caching costs
  when it cannot help (the lookups and bookkeeping).

Reported per workload and setting: wall time, output throughput, mean / p50 / p90 time to first token,
and the prefix-cache hit rate (prompt tokens found in the cache / prompt tokens looked up).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sarathi.config import EngineArgs

    EngineArgs.add_cli_args(p, only=("model", "dtype", "threads"))
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-len", type=int, default=384, help="system prompt tokens")
    p.add_argument("--question-len", type=int, default=24, help="tokens of each new user message")
    p.add_argument("--output-len", type=int, default=32, help="tokens of each answer")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="runs per setting (the median is reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prefix_cache.json"))


def _ttft(o: Any) -> float:
    m = o.metrics
    return m.first_token_time - m.arrival_time


def _generate(llm: Any, prompts: list[list[int]], output_len: int) -> tuple[list[list[int]], list[float]]:
    from sarathi import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [_ttft(o) for o in outs]


def run_shared(llm: Any, ns: argparse.Namespace, vocab: int) -> dict[str, Any]:
    rng = random.Random(ns.seed)
    system = [rng.randrange(100, vocab) for _ in range(ns.system_len)]
    history = [list(system) for _ in range(ns.users)]
    ttfts: list[float] = []
    prompt_tokens = out_tokens = 0
    t0 = time.perf_counter()
    for _ in range(ns.turns):
        prompts = [h + [rng.randrange(100, vocab) for _ in range(ns.question_len)] for h in history]
        answers, t = _generate(llm, prompts, ns.output_len)
        ttfts += t
        prompt_tokens += sum(map(len, prompts))
        out_tokens += sum(map(len, answers))
        history = [p + a for p, a in zip(prompts, answers)]
    return _summary(time.perf_counter() - t0, ttfts, prompt_tokens, out_tokens, llm.engine.kv)


def run_no_reuse(llm: Any, ns: argparse.Namespace, vocab: int) -> dict[str, Any]:
    rng = random.Random(ns.seed + 1)
    n = ns.users * ns.turns
    length = ns.system_len + ns.question_len
    prompts = [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]
    t0 = time.perf_counter()
    answers, ttfts = _generate(llm, prompts, ns.output_len)
    return _summary(time.perf_counter() - t0, ttfts, n * length, sum(map(len, answers)), llm.engine.kv)


def _summary(wall: float, ttfts: list[float], prompt_tokens: int, out_tokens: int, kv: Any) -> dict[str, Any]:
    q = sorted(ttfts)
    return {"wall_s": wall, "output_tok_s": out_tokens / wall, "prompt_tokens": prompt_tokens,
            "output_tokens": out_tokens, "ttft_mean_s": statistics.fmean(q), "ttft_p50_s": q[len(q) // 2],
            "ttft_p90_s": q[min(len(q) - 1, int(0.9 * len(q)))],
            "hit_rate": kv.num_hit_tokens / kv.num_query_tokens if kv.num_query_tokens else 0.0,
            "hit_tokens": kv.num_hit_tokens}


def run(ns: argparse.Namespace) -> int:
    from sarathi import LLM
    from sarathi.bench.common import loadavg

    llm = LLM(model=ns.model, dtype=ns.dtype, threads=ns.threads, chunk_size=ns.chunk_size,
              max_num_seqs=ns.max_num_seqs)
    vocab = min(llm.engine.model_config.vocab_size, llm.get_tokenizer().vocab_size)
    _generate(llm, [[1, 2, 3]], 2)  # warm-up
    results: dict[str, dict[str, list[dict[str, Any]]]] = {"shared": {}, "no_reuse": {}}
    load0 = loadavg()
    for _ in range(ns.repeats):
        for name, fn in (("shared", run_shared), ("no_reuse", run_no_reuse)):
            for on in (False, True):
                llm.engine.reconfigure(enable_prefix_caching=on)  # a fresh, empty cache per run
                results[name].setdefault("on" if on else "off", []).append(fn(llm, ns, vocab))
    med = {w: {k: sorted(v, key=lambda r: r["wall_s"])[len(v) // 2] for k, v in d.items()}
           for w, d in results.items()}
    out = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()
                      if not callable(v)},
           "dtype": str(llm.engine.dtype), "load_avg": [load0, loadavg()], "median": med, "runs": results}
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(out, indent=1))
    print("| workload | caching | wall s | output tok/s | TTFT mean / p90 s | hit rate |")
    print("|---|---|---|---|---|---|")
    for w, d in med.items():
        for k in ("off", "on"):
            r = d[k]
            print(f"| {w} | {k} | {r['wall_s']:.2f} | {r['output_tok_s']:.1f} | {r['ttft_mean_s']:.2f} / "
                  f"{r['ttft_p90_s']:.2f} | {r['hit_rate']:.1%} |")
    for w, d in med.items():
        print(f"{w}: caching on / off wall time = {d['on']['wall_s'] / d['off']['wall_s']:.3f}")
    print(f"saved {ns.out}")
    llm.close()
    return 0
