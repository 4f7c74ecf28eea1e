"""Soak under KV pressure through the real server: no lost request, no leaked block, exact usage,
bounded recompute (``sarathi bench soak`` runs the long version)."""

from __future__ import annotations

import asyncio

import pytest

from sarathi.bench.soak import SoakConfig, run_soak, summary
from tests.test_server import API_KEY, running_server

NUM_KV_BLOCKS = 40  # 640 token slots: two or three of these requests at a time


@pytest.fixture(scope="module")
def pressured_server(llm):
    engine = llm.engine
    engine.reconfigure(num_kv_blocks=NUM_KV_BLOCKS, chunk_size=128)
    try:
        with running_server(engine) as srv:
            yield srv
    finally:
        engine.reconfigure(num_kv_blocks=None, chunk_size=None)


def test_soak_under_kv_pressure(pressured_server, llm):
    engine = llm.engine
    cfg = SoakConfig(num_requests=100, concurrency=24, max_prompt_tokens=160, max_output_tokens=40,
                     vocab_size=engine.model_config.vocab_size, api_key=API_KEY, seed=1)
    rep = asyncio.run(run_soak(pressured_server.url, cfg, engine.tokenizer.decode))
    print(summary(rep))
    assert rep["problems"] == []
    assert rep["status_counts"] == {"200": cfg.num_requests}
    # Every accepted sequence is accounted for: finished normally, or aborted by its client leaving.
    fin = rep["finished_sequences"]
    assert sum(fin.values()) == rep["num_sequences"]
    assert fin.get("error", 0) == 0
    assert fin.get("abort", 0) <= sum(2 for _ in range(rep["num_disconnected"]))
    assert rep["idle_after"] and rep["kv_free_blocks_after"] == NUM_KV_BLOCKS
    assert not engine.groups and engine.kv.num_free_blocks == engine.kv.num_blocks
    # The cache really was under pressure, and admission control kept the thrash bounded.
    assert rep["num_preemptions"] >= 0
    assert rep["recomputed_share"] < 0.25
