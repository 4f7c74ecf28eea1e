"""Prometheus metrics of one server (its own CollectorRegistry, so several apps can share a process).

Updated from the engine thread (prometheus-client is thread-safe) and rendered by ``GET /metrics``.
The per-step histograms and gauges show SARATHI's piggybacking: steps that carry prompt tokens and
decode tokens together are counted in ``sarathi_mixed_steps_total``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sarathi.outputs import RequestMetrics

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, [*labels, *extra], registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self._finished = counter("sarathi_requests_finished", "Finished sequences by finish reason "
                                 "(stop, length, abort, error)", ("finished_reason",))
        self._rejected = counter("sarathi_requests_rejected", "Requests refused because the waiting "
                                 "queue was full").labels(model_name)
        self.prompt_tokens = counter("sarathi_prompt_tokens", "Prefilled prompt tokens").labels(model_name)
        self.generation_tokens = counter("sarathi_generation_tokens", "Generated tokens").labels(model_name)
        self.preemptions = counter("sarathi_num_preemptions", "Sequences preempted (recompute)").labels(
            model_name)
        self.recomputed_tokens = counter("sarathi_recomputed_tokens", "Tokens whose KV cache was discarded "
                                         "by a preemption and must be computed again").labels(model_name)
        self.slow_reader_aborts = counter("sarathi_requests_slow_reader_aborted", "Streams aborted because "
                                          "their client stopped reading").labels(model_name)
        self.steps = counter("sarathi_steps", "Engine steps run").labels(model_name)
        self.mixed_steps = counter("sarathi_mixed_steps", "Steps that ran prompt and decode tokens "
                                   "together (piggybacked decodes)").labels(model_name)
        self.ttft = hist("sarathi_time_to_first_token_seconds", "Arrival to first token", _LATENCY_BUCKETS)
        self.tbt = hist("sarathi_time_between_tokens_seconds", "Time between consecutive outputs of a "
                        "request", _LATENCY_BUCKETS)
        self.e2e = hist("sarathi_e2e_request_latency_seconds", "Arrival to finish", _LATENCY_BUCKETS)
        self.queue_time = hist("sarathi_request_queue_time_seconds", "Arrival to first scheduled",
                               _LATENCY_BUCKETS)
        self.step_prompt_tokens = hist("sarathi_step_prompt_tokens", "Prompt tokens per engine step",
                                       _TOKEN_BUCKETS)
        self.step_decode_tokens = hist("sarathi_step_decode_tokens", "Decode tokens per engine step",
                                       _TOKEN_BUCKETS)
        self.step_duration = hist("sarathi_step_duration_seconds", "Engine step duration", _LATENCY_BUCKETS)
        self.last_step_prompt_tokens = gauge("sarathi_last_step_prompt_tokens",
                                             "Prompt tokens in the latest step")
        self.last_step_decode_tokens = gauge("sarathi_last_step_decode_tokens",
                                             "Decode tokens in the latest step")
        self.running = gauge("sarathi_num_requests_running", "Sequences in the running batch")
        self.waiting = gauge("sarathi_num_requests_waiting", "Sequences waiting to be scheduled")
        self.kv_usage = gauge("sarathi_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)")
        self.kv_free_blocks = gauge("sarathi_kv_cache_free_blocks", "Free KV-cache blocks")
        self.prefix_queries = counter("sarathi_prefix_cache_queries", "Prompt tokens looked up in the "
                                      "prefix cache (vLLM: prefix_cache_queries)").labels(model_name)
        self.prefix_hits = counter("sarathi_prefix_cache_hits", "Prompt tokens found in the prefix cache "
                                   "(their K/V was reused, not computed)").labels(model_name)
        self._prefix_seen = (0, 0)
        self.pipeline_bubble = Gauge("sarathi_pipeline_bubble_fraction", "Per pipeline stage: idle time / "
                                     "wall time while micro-batches were in flight", [*labels, "stage"],
                                     registry=r)
        self.pipeline_bubble_s = gauge("sarathi_pipeline_bubble_seconds", "Idle stage-seconds of the "
                                       "pipeline while micro-batches were in flight (all stages)")

    # ---- updates (engine thread) --------------------------------------------------------------
    def record_step(self, num_prompt: int, num_decode: int, num_preempted: int, duration: float,
                    num_recomputed_tokens: int = 0) -> None:
        self.steps.inc()
        if num_prompt and num_decode:
            self.mixed_steps.inc()
        self.step_prompt_tokens.observe(num_prompt)
        self.step_decode_tokens.observe(num_decode)
        self.step_duration.observe(duration)
        self.last_step_prompt_tokens.set(num_prompt)
        self.last_step_decode_tokens.set(num_decode)
        if num_preempted:
            self.preemptions.inc(num_preempted)
        if num_recomputed_tokens:
            self.recomputed_tokens.inc(num_recomputed_tokens)

    def record_state(self, running: int, waiting: int, kv_usage: float, kv_free: int,
                     prefix_queries: int = 0, prefix_hits: int = 0) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        self.kv_free_blocks.set(kv_free)
        # The engine's counts are cumulative (and start again from 0 when its KV cache is rebuilt).
        q0, h0 = self._prefix_seen if prefix_queries >= self._prefix_seen[0] else (0, 0)
        self.prefix_queries.inc(prefix_queries - q0)
        self.prefix_hits.inc(max(0, prefix_hits - h0))
        self._prefix_seen = (prefix_queries, prefix_hits)

    def record_pipeline(self, report: dict) -> None:
        for st in report["stages"]:
            self.pipeline_bubble.labels(self.model_name, str(st["stage"])).set(st["bubble_fraction"])
        self.pipeline_bubble_s.set(report["bubble_s"])

    def record_finished(self, reasons: list[str], m: RequestMetrics | None, now: float) -> None:
        for reason in reasons:
            self._finished.labels(self.model_name, reason).inc()
        if m is None:
            return
        self.e2e.observe(max(0.0, now - m.arrival_time))
        if m.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, m.first_scheduled_time - m.arrival_time))

    def record_rejected(self) -> None:
        self._rejected.inc()

    def record_slow_reader_abort(self) -> None:
        self.slow_reader_aborts.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
