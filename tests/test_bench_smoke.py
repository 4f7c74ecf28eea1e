"""Smoke tests: ``sarathi bench throughput`` and ``profile`` end to end on the real default model with a
tiny workload (structure and token accounting only; no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

from sarathi.bench import compare, cost_profile, plots
from sarathi.bench import throughput as tp
from sarathi.bench.common import run_meta, save_json
from sarathi.bench.serve import tbt_goodput

FAKE_LIMITS = {"gemm_gflops": {"float32": 100.0, "bfloat16": 20.0}, "mem_bw_gbs": 10.0}


@pytest.fixture
def bench_llm(llm):
    """The session model on one thread (steady on a shared machine); restored to the default
    configuration and thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield llm
    torch.set_num_threads(threads)
    llm.engine.abort_request(list(llm.engine.groups))
    llm.engine.reconfigure(scheduler="sarathi", chunk_size=None, max_num_seqs=256, num_kv_blocks=None,
                           max_num_batched_tokens=None, tile_size=None, block_size=16)


@pytest.mark.slow
def test_throughput_bench_end_to_end(bench_llm, tmp_path):
    P, D, N = 16, 4, 3
    vocab = bench_llm.engine.model_config.vocab_size
    wls = tp.sweep_workloads([P], [P / D], N, vocab)
    policies = tp.make_policies(list(tp.POLICIES), [8])
    body = tp.run_throughput(bench_llm, wls, policies, max_num_seqs=2, limits=FAKE_LIMITS,
                             calibrate_repeats=1, progress=False)
    data = {"meta": run_meta("bench throughput"), "limits": FAKE_LIMITS, **body}
    path = save_json(data, tmp_path / "throughput.json")
    loaded = json.loads(path.read_text())
    assert loaded["meta"]["loadavg_start"] is not None and loaded["meta"]["torch_threads"] >= 1
    assert loaded["policies"] == ["sarathi-c8", "vllm", "orca", "request_level"]
    assert loaded["cost_models"][wls[0].name]["grid"]
    results = loaded["results"]
    assert len(results) == len(wls) * len(policies)
    for r, wl in zip(results, [w for w in wls for _ in policies]):
        assert r["workload"] == wl.name
        expect_prompt = sum(q.prompt_len for q in wl.requests)
        expect_out = sum(q.max_tokens for q in wl.requests)
        assert r["num_requests"] == len(wl.requests)
        assert r["generated_tokens"] == r["expected_generated_tokens"] == expect_out
        assert r["num_preempted"] == 0
        assert r["scheduled_prompt_tokens"] == r["prompt_tokens"] == expect_prompt
        # the first output token comes with the last prompt chunk; every other one is a decode
        assert r["scheduled_decode_tokens"] == expect_out - len(wl.requests)
        assert r["steps_prefill_only"] + r["steps_decode_only"] + r["steps_mixed"] == r["num_steps"]
        assert r["prefill_time_s"] + r["decode_time_s"] == pytest.approx(r["steps_s"], rel=1e-6)
        assert r["throughput_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert r["decode_tok_s_proportional"] > 0 and r["decode_time_s_marginal"] >= 0
        if r["policy"] == "vllm":
            assert r["steps_mixed"] == 0 and r["speedup_throughput_tok_s"] == pytest.approx(1.0)
        if r["policy"] == "sarathi-c8":
            assert r["steps_mixed"] > 0  # 16-token prompts in 8-token chunks, decodes ride along
    assert "| sarathi-c8 |" in tp.table(results)
    assert plots.plot_throughput(loaded, tmp_path / "t.png").stat().st_size > 0

    peer = {"engine": "vllm-cpu", "throughput_tok_s": 10.0, "output_throughput_tok_s": 2.0,
            "total_time_s": 1.0, "total_generated_tokens": 2}
    (tmp_path / "peer.json").write_text(json.dumps(peer))
    merged = compare.compare([path, tmp_path / "peer.json"], workload=wls[0].name)
    rows = merged["offline"]
    assert [r["engine"] for r in rows][-1] == "vllm-cpu" and len(rows) == len(policies) + 1
    assert rows[0]["x vllm-cpu"] == pytest.approx(rows[0]["throughput_tok_s"] / 10.0)


@pytest.mark.slow
def test_profile_bench_end_to_end(bench_llm, tmp_path):
    data = cost_profile.run_profile(bench_llm, [8, 16], [1, 2], context=16, repeats=1, limits=FAKE_LIMITS,
                                    mixed_chunk=16, mixed_decodes=[1], progress=False)
    data["meta"] = run_meta("bench profile")
    loaded = json.loads(save_json(data, tmp_path / "profile.json").read_text())
    assert [r["num_prompt_tokens"] for r in loaded["prefill"]] == [8, 16]
    assert [r["num_decode_tokens"] for r in loaded["decode"]] == [1, 2]
    for r in loaded["prefill"] + loaded["decode"]:
        assert r["time_ms"] > 0 and r["flops"] > 0 and r["intensity"] > 0
        parts = r["linear_ms"] + r["attention_ms"] + r["other_ms"]
        assert parts == pytest.approx(r["time_ms"], rel=1e-6)
        assert r["linear_ms"] > 0
    (mix,) = loaded["decode_maximal"]
    assert mix["prompt_tokens"] + mix["decodes"] == 16
    assert loaded["ridge"]["ridge_flop_per_byte"] == pytest.approx(10.0)
    assert loaded["ridge"]["predicted_ridge_batch"] > 0
    assert any("ridge" in line for line in cost_profile.summary_lines(loaded))
    assert plots.plot_profile(loaded, tmp_path / "p.png").stat().st_size > 0


def test_tbt_goodput():
    reqs = [{"success": True, "ttft": 0.1, "itl": [0.01, 0.02]},
            {"success": True, "ttft": 0.1, "itl": [0.01, 0.5]},  # one stalled gap
            {"success": True, "ttft": 0.9, "itl": [0.01]},  # late first token
            {"success": False, "ttft": 0.0, "itl": []}]
    g = tbt_goodput(reqs, 2.0, slo_ttft_ms=200, slo_tbt_ms=100)
    assert g["good_requests_tbt"] == 1 and g["request_goodput_tbt"] == pytest.approx(0.5)
    assert g["tbt_slo_attainment"] == pytest.approx(4 / 5)
