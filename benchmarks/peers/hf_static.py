"""Run a workload through HF transformers ``generate`` with static batching; write timing JSON.

The classic request-level baseline: requests are taken in workload order in batches of
``--batch-size``, left-padded to the longest prompt of the batch, and decoded greedily
until the batch's longest ``max_tokens`` (``min_new_tokens = max_new_tokens`` stands in
for ``ignore_eos``). Shorter requests in a batch keep decoding as padding work; only
their requested tokens count as generated (the extra is reported as
``wasted_generated_tokens``).

Standalone (no ``sarathi`` import). Usage::

    .venv/bin/python benchmarks/peers/hf_static.py --workload W.json --out R.json \\
        [--model DIR] [--batch-size 8] [--dtype float32] [--threads N]
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
    parser = argparse.ArgumentParser(description="HF transformers static-batching peer")
    parser.add_argument("--workload", type=Path, required=True, help="workload JSON")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa | eager)")
    parser.add_argument("--warmup", type=int, default=1, help="tiny warm-up generate calls before timing")
    return parser.parse_args(argv)


def make_batch(prompts: list[list[int]], pad_id: int):
    """Left-pad token-id lists into ``(input_ids, attention_mask)`` tensors."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
    return ids, mask


def generate_batch(model, prompts: list[list[int]], new_tokens: int, pad_id: int):
    """Greedy-generate exactly ``new_tokens`` for each prompt; return the new token ids."""
    import torch

    ids, mask = make_batch(prompts, pad_id)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return out[:, ids.shape[1] :]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    items = json.loads(args.workload.read_text())
    prompts = [[int(t) for t in it["prompt_token_ids"]] for it in items]
    max_tokens = [int(it["max_tokens"]) for it in items]

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation=args.attn
    ).eval()
    load_s = time.perf_counter() - t0
    cfg = model.generation_config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    if pad_id is None:
        pad_id = 0

    for _ in range(args.warmup):
        generate_batch(model, prompts[:1], 2, pad_id)

    gen_tokens = wasted = padded_prompt_tokens = 0
    batch_times = []
    load_start = [round(x, 2) for x in os.getloadavg()]
    t1 = time.perf_counter()
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        wants = max_tokens[start : start + args.batch_size]
        tb = time.perf_counter()
        new = generate_batch(model, batch, max(wants), pad_id)
        batch_times.append(time.perf_counter() - tb)
        gen_tokens += sum(min(w, new.shape[1]) for w in wants)
        wasted += new.shape[0] * new.shape[1] - sum(wants)
        padded_prompt_tokens += len(batch) * max(len(p) for p in batch)
    total_s = time.perf_counter() - t1

    prompt_tokens = sum(len(p) for p in prompts)
    result = {
        "engine": "hf-transformers-static",
        "mode": "offline",
        "workload": str(args.workload),
        "loadavg_start": load_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "model": str(args.model),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "attn_implementation": args.attn,
        "num_requests": len(prompts),
        "load_s": load_s,
        "total_time_s": total_s,
        "total_prompt_tokens": prompt_tokens,
        "total_generated_tokens": gen_tokens,
        "padded_prompt_tokens": padded_prompt_tokens,
        "wasted_generated_tokens": wasted,
        "throughput_tok_s": (prompt_tokens + gen_tokens) / total_s,
        "output_throughput_tok_s": gen_tokens / total_s,
        "request_throughput": len(prompts) / total_s,
        "batch_times_s": batch_times,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
