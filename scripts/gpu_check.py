"""One-shot CUDA check of the engine, for sessions lent a GPU (the CPU suite never sees CUDA).

1. Greedy parity on CUDA in float32: every policy and several chunk sizes against HF transformers'
   greedy loop on the same random-weight SmolLM2-135M-shaped model (no checkpoint travels: the weights
   are made on the spot from a seed, so only the tokenizer files are needed).
2. bfloat16 throughput of a Llama-3.2-1B-shaped random model, prefill-heavy and decode-heavy, per policy.

    python3 scripts/gpu_check.py --tokenizer-small DIR --tokenizer-1b DIR [--out results.json]

DIRs hold tokenizer.json and tokenizer_config.json (SmolLM2's, and the 1B folder's padded one, as
written by scripts/make_random_llama.py). Prints a JSON report and exits 1 when a parity check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_random_llama import CONFIG, weights  # noqa: E402

SMALL = CONFIG | {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                  "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                  "rope_theta": 100000.0, "rope_scaling": None}


DEV = "cuda"


def _sync() -> None:
    gc.collect()  # a dropped LLM holds reference cycles: free its weights and KV before the next one
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def write_model(out: Path, cfg: dict, tokenizer: Path, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, out / name)
    save_file(weights(cfg, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=DEV)
    past, out = None, []
    for _ in range(n):
        o = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = o.past_key_values
        t = int(o.logits[0, -1].argmax())
        out.append(t)
        ids = torch.tensor([[t]], device=DEV)
    return out


def parity(model_dir: Path, n_out: int) -> dict:
    from transformers import AutoModelForCausalLM

    from sarathi import LLM, SamplingParams

    g = torch.Generator().manual_seed(1)
    lens = [5, 17, 64, 130, 300, 513]
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lens]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEV).eval()
    ref = [hf_greedy(hf, p, n_out) for p in prompts]
    del hf
    _sync()
    sp = SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True)
    runs = [("sarathi", 16), ("sarathi", 64), ("sarathi", 256), ("sarathi", 2048), ("vllm", None),
            ("orca", None)]
    report: dict = {}
    for policy, chunk in runs:
        llm = LLM(model=str(model_dir), device=DEV, dtype="float32", scheduler=policy, chunk_size=chunk,
                  max_num_seqs=4, enable_prefix_caching=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                      for x, y in zip(got, ref)]
        report[f"{policy}/{chunk}"] = {"identical": got == ref, "first_diff": first_diff}
        del llm
        _sync()
    # Prefix caching on, and the same prompts twice: the second pass must hit and still match.
    llm = LLM(model=str(model_dir), device=DEV, dtype="float32", chunk_size=64, max_num_seqs=4)
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    report["sarathi/64+prefix-cache"] = {
        "identical": [list(o.outputs[0].token_ids) for o in outs] == ref,
        "cached_tokens": sum(o.num_cached_tokens or 0 for o in outs)}
    return report


def throughput(model_dir: Path, n_req: int, cudnn_ab: bool = False) -> dict:
    from sarathi import LLM, SamplingParams

    g = torch.Generator().manual_seed(2)
    report: dict = {}
    for p_len, d_len in ((512, 32), (128, 128)):
        prompts = [{"prompt_token_ids": torch.randint(3, 128000, (p_len,), generator=g).tolist()}
                   for _ in range(n_req)]
        sp = SamplingParams(max_tokens=d_len, temperature=0.0, ignore_eos=True)
        runs = [(p, c, False) for p, c in (("sarathi", 512), ("sarathi", 2048), ("vllm", None))]
        if cudnn_ab:  # the same with cuDNN attention back on (the engine turns it off: configure_sdpa)
            runs += [("sarathi", 512, True), ("vllm", None, True)]
        for policy, chunk, cudnn in runs:
            llm = LLM(model=str(model_dir), device=DEV, dtype="bfloat16", scheduler=policy,
                      chunk_size=chunk, max_num_seqs=n_req, enable_prefix_caching=False)
            if cudnn:
                torch.backends.cuda.enable_cudnn_sdp(True)
            llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm
            _sync()
            t0 = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            _sync()
            dt = time.perf_counter() - t0
            steps = llm.engine.stats.num_steps if hasattr(llm.engine.stats, "num_steps") else None
            report[f"P{p_len}/D{d_len}/{policy}/{chunk}" + ("/cudnn" if cudnn else "")] = {
                "seconds": round(dt, 3), "tok_per_s": round(n_req * (p_len + d_len) / dt, 1),
                "output_tok_per_s": round(n_req * d_len / dt, 1), "steps": steps}
            del llm
            _sync()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-small", type=Path, required=True)
    ap.add_argument("--tokenizer-1b", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sarathi-gpu"))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cudnn-ab", action="store_true", help="also time with cuDNN attention on")
    ap.add_argument("--dry-run", action="store_true", help="on CPU with 2-layer models: checks the script")
    ns = ap.parse_args()
    global DEV
    small_cfg, big_cfg = SMALL, CONFIG
    if ns.dry_run:
        DEV = "cpu"
        small_cfg, big_cfg = SMALL | {"num_hidden_layers": 2}, CONFIG | {"num_hidden_layers": 1}
    t0 = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                    "torch": torch.__version__}
    small = write_model(ns.work / "small", small_cfg, ns.tokenizer_small, seed=0)
    report["parity_fp32"] = parity(small, n_out=24)
    print(json.dumps(report, indent=1), flush=True)
    big = write_model(ns.work / "1b", big_cfg, ns.tokenizer_1b, seed=0)
    report["throughput_bf16"] = throughput(big, ns.requests, ns.cudnn_ab)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if ns.out:
        ns.out.write_text(text)
    sys.exit(0 if all(v["identical"] for v in report["parity_fp32"].values()) else 1)


if __name__ == "__main__":
    main()
