"""``--chunk-size auto``: the tuner's budget for the loaded model on this machine's profile.

Every test points ``$SARATHI_CACHE`` at ``tmp_path`` and writes a fixture profile there (or fakes the
profiler), so nothing is written into the user's home; one slow test measures the quick profile for real
(about 10 s on the 2-core machine).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from sarathi.config import EngineArgs
from sarathi.model.config import ModelConfig
from sarathi.sampling_params import SamplingParams
from sarathi.sim import autotune, calibrate, tune
from sarathi.sim.autotune import auto_choice, auto_chunk_size, cache_path
from sarathi.sim.hardware import HardwareSpec, local_profile_path
from tests.conftest import PROMPTS

# This machine's full profile (2-core EPYC, 1 thread), without its samples.
FIXTURE = HardwareSpec("local", {"float32": 68.3e9, "bfloat16": 147.3e9}, 18.4e9, 25e9, tile=16,
                       matmul_efficiency=1.0, attention_efficiency=1.0, bw_efficiency=1.0,
                       layer_overhead_s=0.0,
                       decode_attention_padded=True, linear_scale=1.33, attention_scale=2.62,
                       seq_overhead_s=4.5e-3, notes="test fixture",
                       measured={"dtype": "float32", "threads": 1, "fit_median_rel_error": 0.05})


@pytest.fixture(scope="module")
def model_config() -> ModelConfig:
    """The default checkpoint's shape (GGUF metadata only, no weights)."""
    from sarathi.model.loader import load_model_config, resolve_model

    return load_model_config(resolve_model(None))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """``$SARATHI_CACHE`` in tmp_path holding the fixture profile; measuring would fail the test."""
    monkeypatch.setenv("SARATHI_CACHE", str(tmp_path))
    FIXTURE.save(local_profile_path())

    def no_profiling(*a, **k):
        raise AssertionError("the profile exists: nothing may be measured")

    monkeypatch.setattr(calibrate, "profile_local", no_profiling)
    return tmp_path


def test_auto_chunk_size_follows_the_tuner(cache, model_config) -> None:
    args = EngineArgs(dtype="float32")
    c = auto_choice(args, model_config)
    assert isinstance(c.chunk_size, int) and not c.cached
    assert max(16, c.tile) <= c.chunk_size <= c.max_model_len == 8192
    # 2 GiB of float32 KV: 46,603 tokens, 41 requests of P + D = 1024 + 102 tokens.
    assert (c.P, c.D, c.B, c.kv_tokens, c.dtype) == (1024, 102, 41, 46603, "float32")
    assert c.slo_default and c.slo_tbt_ms > 0 and c.step_ms <= c.slo_tbt_ms
    assert c.chunk_size == min(c.pd_rule, c.slo_max) and c.chunk_size % c.tile == 0
    # `sarathi tune` on the same inputs (the engine's ModelConfig object, the local spec) agrees.
    cfg = tune.SimConfig(model=model_config, hardware=FIXTURE, max_num_seqs=c.B, tile_size=c.tile,
                         dtype="float32", num_kv_blocks=4096)
    r = tune.recommend(cfg, c.P, c.D, slo_tbt_ms=c.slo_tbt_ms, simulate=False)
    assert (r.chunk_size, r.pd_rule, r.slo_max) == (c.chunk_size, c.pd_rule, c.slo_max)
    assert str(c.B) in c.tune_command("m.gguf") and "--hardware local" in c.tune_command("m.gguf")
    assert cache_path().parent == cache and cache_path().exists()


def test_auto_chunk_size_is_deterministic_and_cached(cache, model_config, monkeypatch) -> None:
    args = EngineArgs(dtype="float32", max_num_seqs=8)
    first = auto_chunk_size(args, model_config)
    cache_path().unlink()
    assert auto_chunk_size(args, model_config) == first, "recomputed: the same budget"

    def no_rules(*a, **k):
        raise AssertionError("a cached choice must not be recomputed")

    monkeypatch.setattr(autotune, "choose_budget", no_rules)
    c = auto_choice(args, model_config)
    assert c.cached and c.chunk_size == first
    # Another input is another entry: the cache does not answer for it.
    with pytest.raises(AssertionError, match="recomputed"):
        auto_chunk_size(replace(args, max_num_seqs=9), model_config)
    # A new profile (re-measured machine) invalidates the cached choice too.
    replace(FIXTURE, linear_scale=2.0).save(local_profile_path())
    with pytest.raises(AssertionError, match="recomputed"):
        auto_chunk_size(args, model_config)


def test_auto_chunk_size_clamps(cache, model_config) -> None:
    # A short context: P + D fit in it, and the budget never exceeds it.
    c = auto_choice(EngineArgs(dtype="float32", max_model_len=12), model_config)
    assert c.P + c.D <= 12 and 1 <= c.chunk_size <= 12
    # One request's worth of KV: B = 1, nothing to piggyback: the P:D rule gives one tile.
    c = auto_choice(EngineArgs(dtype="float32", num_kv_blocks=64), model_config)
    assert (c.kv_tokens, c.B, c.P + c.D) == (1024, 1, 1024) and c.chunk_size == 16
    # An explicit tile: a multiple of it; an SLO no step meets: one tile.
    c = auto_choice(EngineArgs(dtype="float32", tile_size=64), model_config)
    assert c.chunk_size % 64 == 0 and c.chunk_size >= 64
    c = auto_choice(EngineArgs(dtype="float32"), model_config, slo_tbt_ms=1e-3)
    assert c.chunk_size == 16 and not c.slo_default
    # The caller's KV size, prompt and output lengths win over the defaults.
    c = auto_choice(EngineArgs(dtype="float32"), model_config, num_kv_tokens=10_000, prompt_len=500,
                    output_len=100)
    assert (c.P, c.D, c.B) == (500, 100, 16)


def test_missing_profile_is_measured_once(tmp_path, monkeypatch, model_config, caplog) -> None:
    import torch

    monkeypatch.setenv("SARATHI_CACHE", str(tmp_path))
    calls = []

    def fake_profile(engine=None, threads=1, save=True, quick=False):
        calls.append((threads, quick))
        torch.set_num_threads(threads)
        spec = replace(FIXTURE, notes="fake measurement")
        return spec, spec.save(local_profile_path())

    monkeypatch.setattr(calibrate, "profile_local", fake_profile)
    before = torch.get_num_threads()
    with caplog.at_level(logging.WARNING, logger="sarathi"):
        first = auto_chunk_size(EngineArgs(dtype="float32"), model_config)
    assert calls == [(1, True)], "one quick profile, with one torch thread"
    assert torch.get_num_threads() == before, "the engine's thread count is restored"
    assert "measuring it once" in caplog.text and "profiled this machine in" in caplog.text
    assert local_profile_path() == tmp_path / "hardware_local.json" and local_profile_path().exists()
    assert auto_chunk_size(EngineArgs(dtype="float32"), model_config) == first
    assert auto_chunk_size(EngineArgs(dtype="float32", max_num_seqs=4), model_config) >= 16
    assert len(calls) == 1


def test_tune_cli_local_measures_a_missing_profile(tmp_path, monkeypatch, capsys) -> None:
    from sarathi.cli import main

    monkeypatch.setenv("SARATHI_CACHE", str(tmp_path))
    calls = []

    def fake_profile(engine=None, threads=1, save=True, quick=False):
        calls.append(quick)
        return FIXTURE, FIXTURE.save(local_profile_path())

    monkeypatch.setattr(calibrate, "profile_local", fake_profile)
    args = ["tune", "--model", "llama-2-7b", "--hardware", "local", "--max-num-seqs", "4", "--prompt-len",
            "256", "--output-len", "16", "--no-simulate"]
    assert main(args) == 0 and main(args) == 0
    assert calls == [True], "measured once, then read from the cache"
    assert "recommended chunk size" in capsys.readouterr().out



def test_llm_chunk_size_auto_generates_the_same_tokens(cache, engine, one_thread) -> None:
    """End to end: ``LLM(chunk_size="auto")`` on the default model picks the tuner's budget and its greedy
    tokens equal those of the shared engine at a fixed budget."""
    from sarathi import LLM

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    auto = LLM(dtype="float32", chunk_size="auto", num_kv_blocks=64, max_num_seqs=4)
    try:
        want = auto_chunk_size(auto.engine.args, auto.engine.model_config)
        assert auto.engine.auto_chunk_size == want == 16, "64 blocks hold one request: one tile"
        assert auto.engine.scheduler.config.token_budget == want
        got = [o.outputs[0].token_ids for o in auto.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        auto.engine.shutdown()
    engine.reconfigure(chunk_size=512, num_kv_blocks=64, max_num_seqs=4)
    fixed = LLM.from_engine(engine)
    ref = [o.outputs[0].token_ids for o in fixed.generate(PROMPTS, params, use_tqdm=False)]
    assert got == ref and all(len(t) == 8 for t in got)


@pytest.mark.slow
def test_quick_profile_measures_this_machine(tmp_path, monkeypatch) -> None:
    """The real thing, once: the quick preset on the default model, cached in tmp_path."""
    import time

    import torch

    monkeypatch.setenv("SARATHI_CACHE", str(tmp_path))
    before = torch.get_num_threads()
    t0 = time.perf_counter()
    spec = calibrate.ensure_local_profile()
    took = time.perf_counter() - t0
    assert torch.get_num_threads() == before
    assert local_profile_path().exists()
    assert spec.measured["preset"] == "quick" and spec.measured["threads"] == 1
    samples = spec.measured["samples"]
    assert len(samples) == 14 and all(s["seconds"] > 0 for s in samples)
    assert spec.tile in calibrate.TILE_CANDIDATES and spec.linear_scale > 0 and spec.attention_scale > 0
    again = calibrate.ensure_local_profile()  # the second call reads the cache (JSON: tuples become lists)
    assert again.to_json() == json.loads(json.dumps(spec.to_json()))
    assert took < 120, f"quick profile took {took:.0f} s"
