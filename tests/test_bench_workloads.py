"""Fast tests for benchmark workloads, roofline arithmetic and serve-client metric math."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sarathi.bench import roofline, workloads
from sarathi.bench.serve_client import RequestOutcome, check_loopback, compute_metrics
from sarathi.bench.workloads import BenchRequest


def test_fixed_shapes_and_token_range():
    reqs = workloads.fixed(16, 4, 10, vocab_size=500, seed=1)
    assert len(reqs) == 10
    assert all(r.prompt_len == 16 and r.max_tokens == 4 and r.arrival_time == 0.0 for r in reqs)
    ids = np.array([t for r in reqs for t in r.prompt_token_ids])
    assert ids.min() >= workloads.DEFAULT_MIN_TOKEN_ID and ids.max() < 500
    assert all(isinstance(t, int) for t in reqs[0].prompt_token_ids)


def test_deterministic_given_seed():
    a = workloads.ranged((5, 50), (1, 20), 20, seed=3)
    b = workloads.ranged((5, 50), (1, 20), 20, seed=3)
    c = workloads.ranged((5, 50), (1, 20), 20, seed=4)
    assert a == b
    assert a != c
    assert workloads.sharegpt_like(30, seed=7) == workloads.sharegpt_like(30, seed=7)
    assert workloads.poisson_arrivals(2.0, 10, seed=5) == workloads.poisson_arrivals(2.0, 10, seed=5)


def test_ranged_bounds_inclusive():
    reqs = workloads.ranged((3, 4), (7, 7), 200, vocab_size=1000, seed=0)
    assert {r.prompt_len for r in reqs} == {3, 4}
    assert {r.max_tokens for r in reqs} == {7}
    with pytest.raises(ValueError):
        workloads.ranged((5, 4), (1, 1), 3)


def test_lognormal_params_recover_median_and_p90():
    mu, sigma = workloads.lognormal_params(415.0, 834.0)
    assert math.exp(mu) == pytest.approx(415.0)
    assert math.exp(mu + 1.2815515655446004 * sigma) == pytest.approx(834.0)


def test_sharegpt_like_statistics_and_caps():
    reqs = workloads.sharegpt_like(4000, seed=0, max_len=1024)
    assert all(r.prompt_len + r.max_tokens <= 1024 for r in reqs)
    assert all(r.prompt_len >= 4 and r.max_tokens >= 1 for r in reqs)
    s = workloads.summarize(reqs)
    scale = workloads.SHAREGPT_SCALE
    assert s["median_prompt_len"] == pytest.approx(1730 * scale, rel=0.1)
    assert s["median_output_len"] == pytest.approx(415 * scale, rel=0.1)
    assert s["p90_output_len"] == pytest.approx(834 * scale, rel=0.1)


def test_arrivals():
    assert workloads.poisson_arrivals(math.inf, 4) == [0.0] * 4
    times = workloads.poisson_arrivals(10.0, 5000, seed=2)
    assert times[0] == 0.0
    assert all(b >= a for a, b in zip(times, times[1:], strict=False))
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(0.1, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)
    bursty = np.diff(workloads.gamma_arrivals(10.0, 3.0, 5000, seed=2))
    assert bursty.mean() == pytest.approx(0.1, rel=0.2)
    assert bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.2)
    with pytest.raises(ValueError):
        workloads.gamma_arrivals(0.0, 1.0, 3)


def test_json_round_trip(tmp_path):
    reqs = workloads.with_arrivals(workloads.fixed(3, 2, 3), [0.0, 0.5, 1.5])
    path = tmp_path / "w.json"
    workloads.save_workload(reqs, path)
    assert workloads.load_workload(path) == reqs
    assert workloads.from_json_list([{"prompt_token_ids": [1, 2], "max_tokens": 3}]) == [
        BenchRequest([1, 2], 3, 0.0)
    ]


def test_roofline_counts_smollm2():
    m = roofline.SMOLLM2_135M
    assert roofline.param_count(m) == 134_515_008  # the checkpoint's parameter count
    linear = 2 * m.layers * roofline.linear_params_per_layer(m)
    head = 2 * m.hidden * m.vocab
    assert roofline.model_flops_per_token(m) == linear + head
    # causal prefill of P tokens attends to P(P+1)/2 positions in total
    p = 10
    attn = 4 * m.layers * m.heads * m.hd * p * (p + 1) // 2
    assert roofline.prefill_flops(m, p) == p * linear + attn + head
    assert roofline.decode_flops(m, [0, 0]) == 2 * roofline.model_flops_per_token(m)
    assert roofline.model_bytes(m, "bfloat16") * 2 == roofline.model_bytes(m, "float32")
    assert roofline.kv_cache_bytes(m, 1, "float32") == 2 * 30 * 3 * 64 * 4
    assert roofline.mfu(2e9, 1.0, 4.0) == pytest.approx(0.5)
    shape = roofline.LlamaShape.from_hf_config(
        {
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
            "head_dim": 64,
            "tie_word_embeddings": True,
        }
    )
    assert shape == m


def _outcome(start, ttft, itl, prompt_len=10, success=True):
    return RequestOutcome(
        prompt_len=prompt_len,
        max_tokens=len(itl) + 1,
        success=success,
        start_time=start,
        ttft=ttft,
        latency=ttft + sum(itl),
        itl=list(itl),
        output_tokens=len(itl) + 1,
    )


def test_compute_metrics_synthetic():
    a = _outcome(0.0, 0.1, [0.01, 0.01, 0.01])  # 4 tokens, e2el 0.13
    b = _outcome(0.5, 0.3, [0.02, 0.5, 0.02])  # one 500 ms gap: a stall
    failed = RequestOutcome(prompt_len=7, max_tokens=4, error="boom")
    m = compute_metrics([a, b, failed], duration_s=2.0, percentiles=[50, 99])
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["total_input_tokens"] == 20 and m["total_output_tokens"] == 8
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["total_token_throughput"] == pytest.approx(14.0)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p50_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx((10.0 + 180.0) / 2)
    assert m["mean_e2el_ms"] == pytest.approx((130.0 + 840.0) / 2)
    assert m["median_itl_ms"] == pytest.approx(15.0)
    assert m["max_itl_ms"] == pytest.approx(500.0)
    assert m["stall_threshold_ms"] == pytest.approx(75.0)
    assert m["num_stalls"] == 1 and m["requests_with_stalls"] == 1
    assert m["total_stall_time_ms"] == pytest.approx(500.0)
    assert m["request_goodput"] is None
    assert m["max_concurrent_requests"] == 2


def test_goodput_and_explicit_stall_threshold():
    a = _outcome(0.0, 0.1, [0.01, 0.01])
    b = _outcome(0.0, 0.4, [0.01, 0.01])
    m = compute_metrics([a, b], duration_s=1.0, slo_ttft_ms=200.0, slo_tpot_ms=50.0, stall_threshold_ms=5.0)
    assert m["request_goodput"] == pytest.approx(1.0)
    assert m["goodput_slos_ms"] == {"ttft": 200.0, "tpot": 50.0}
    assert m["num_stalls"] == 4


def test_compute_metrics_empty_and_single_token():
    m = compute_metrics([], duration_s=1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0 and m["num_stalls"] == 0
    one = _outcome(0.0, 0.05, [])
    m = compute_metrics([one], duration_s=1.0)
    assert m["completed"] == 1 and m["mean_tpot_ms"] == 0.0 and m["mean_itl_ms"] == 0.0


def test_loopback_only():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000"):
        check_loopback(url)
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError):
            check_loopback(url)
