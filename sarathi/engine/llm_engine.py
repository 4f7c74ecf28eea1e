"""LLMEngine: input processing -> (schedule -> execute -> update) -> output processing.

One step, as data:
- ``Scheduler.schedule()`` reads and writes ``Request``s (the only writer) and returns a ``StepPlan``;
- ``Executor.submit(plan)`` sees only the plan and returns a ``ModelOutput`` (a token per request id);
- ``Scheduler.update_from_output(plan, output)`` appends tokens, stops, frees -> ``SeqUpdate``s;
- ``OutputProcessor.process(updates)`` detokenizes, finds stop strings -> ``RequestOutput``s.
Up to ``executor.max_in_flight`` plans are in flight at once (pipeline stages); the local executor
holds one, which makes ``step()`` one synchronous iteration.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from sarathi.config import EngineArgs
from sarathi.engine.group import PromptType, RequestGroup
from sarathi.engine.input_processor import InputProcessor
from sarathi.engine.output_processor import OutputProcessor
from sarathi.errors import InvalidArgument
from sarathi.executor import Executor, get_executor_class
from sarathi.kv_cache import BlockManager
from sarathi.model.config import ModelConfig
from sarathi.outputs import RequestOutput
from sarathi.request import RequestStatus
from sarathi.sampling_params import SamplingParams
from sarathi.scheduler import ModelOutput, SchedulerConfig, SeqUpdate, StepPlan, make_scheduler
from sarathi.structured import StructuredOutputs
from sarathi.tokenizer import Tokenizer
from sarathi.trace import Tracer

logger = logging.getLogger("sarathi")


@dataclass
class StepRecord:
    """What one engine step ran (for benchmarks and metrics)."""

    step: int
    start: float
    duration: float
    num_prompt_tokens: int
    num_decode_tokens: int
    num_requests: int
    num_preempted: int
    num_recomputed_tokens: int = 0  # KV tokens discarded by this step's preemptions (computed again later)
    num_failed: int = 0  # requests that failed inside this step (their batch-mates were not affected)


@dataclass
class EngineStats:
    """The newest million ``StepRecord``s (``num_steps`` counts all) and the executor's pipeline bubbles.

    ``bubbles`` is None unless the executor is a pipeline; then it is the executor's ``bubble_report()``,
    counted since the engine was built or last reconfigured, up to the last micro-batch collected:
    ``{"pending_s": wall seconds with a plan in flight, "bubble_s": idle stage-seconds of all stages,
    "stages": [{"stage", "compute_s", "comm_s", "idle_s", "micro_batches", "bubble_fraction"}],
    "layers": [(first, end) per stage]}`` where a stage's ``bubble_fraction`` is ``idle_s / pending_s``.
    """

    steps: deque[StepRecord] = field(default_factory=lambda: deque(maxlen=1_000_000))
    num_steps: int = 0
    bubble_report: Callable[[], dict[str, Any] | None] | None = field(default=None, repr=False,
                                                                       compare=False)

    @property
    def bubbles(self) -> dict[str, Any] | None:
        return self.bubble_report() if self.bubble_report is not None else None

    @property
    def bubble_fractions(self) -> list[float] | None:
        """Per stage: idle / wall time with work in flight (None without a pipeline)."""
        rep = self.bubbles
        return None if rep is None else [s["bubble_fraction"] for s in rep["stages"]]

    @property
    def bubble_seconds(self) -> float | None:
        """Idle stage-seconds of the whole pipeline (None without a pipeline)."""
        rep = self.bubbles
        return None if rep is None else rep["bubble_s"]


@dataclass
class _InFlight:
    plan: StepPlan
    future: Future[ModelOutput]
    start: float  # engine clock when scheduled
    t0: float  # perf_counter when scheduled
    lane: int = 0  # trace track of an engine-recorded step: plans in flight together never share one


class LLMEngine:
    """Continuous-batching engine. Not thread-safe: drive it from one thread.

    ``clock`` gives request timestamps (a simulator passes a virtual one); ``executor_class`` overrides
    the executor that ``args.executor`` names. ``model_config`` builds the engine around a model shape
    without reading ``args.model`` (the simulator's paper-scale models have no checkpoint); with it,
    ``tokenizer=None`` means prompts must be token ids and outputs carry no text.
    """

    def __init__(self, args: EngineArgs, clock: Callable[[], float] = time.time,
                 executor_class: type[Executor] | None = None, model_config: ModelConfig | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        from sarathi.model.loader import load_model_config, resolve_model

        args.check()
        args.apply_process_settings()
        self.args = args
        self.clock = clock
        if model_config is None:
            src = resolve_model(args.model)
            model_config = load_model_config(src)
            tokenizer = tokenizer or Tokenizer.load(src)
        elif tokenizer is None:
            from sarathi.sim.tokenizer import TokenIdsOnly

            tokenizer = TokenIdsOnly()  # type: ignore[assignment]
        self.model_config = cfg = model_config
        self.model_name = args.model or "SmolLM2-135M-Instruct"
        self.max_model_len = args.resolved_max_model_len(cfg)
        self.tokenizer = tokenizer
        eos = [*cfg.eos_token_ids, *([self.tokenizer.eos_token_id]
                                     if self.tokenizer.eos_token_id is not None else [])]
        self.eos_token_ids = tuple(dict.fromkeys(eos))
        # --pipeline-parallel-size N > 1 with the default executor means the pipeline executor.
        name = "pipeline" if args.pipeline_parallel_size > 1 and args.executor == "local" else args.executor
        self.executor = (executor_class or get_executor_class(name))(args, cfg)
        self.dtype = getattr(self.executor, "dtype", None)
        self.structured, refusal = self._structured_outputs()
        # A weak reference: a closure over self would make engine and input processor a cycle, and a
        # dropped engine's weights and KV cache would then wait for the cyclic GC (which large tensors
        # do not trigger: a second LLM in the same process could run out of memory).
        ref = weakref.ref(self)

        def kv_slots() -> int:
            eng = ref()
            return 0 if eng is None else eng.kv.num_blocks * eng.kv.block_size

        self.input = InputProcessor(self.tokenizer, cfg.vocab_size, self.max_model_len, kv_slots, clock,
                                    getattr(self.executor, "supports_prompt_logprobs", False),
                                    self.structured, refusal)
        self.output = OutputProcessor(self.tokenizer)
        self.stats = EngineStats(bubble_report=self.executor.bubble_report)
        self._in_flight: deque[_InFlight] = deque()
        self._init_trace(args.trace)
        self._build_runtime()
        logger.info("engine ready: %s, %s, %s executor, %d KV blocks x %d tokens, scheduler %s",
                    self.model_name, self.dtype, self.executor.name, self.kv.num_blocks, args.block_size,
                    args.scheduler)

    def _structured_outputs(self) -> tuple[StructuredOutputs | None, str]:
        """The grammar compiler (nothing is loaded until the first structured request), or None and why
        structured outputs are refused: the executor must apply the masks that plans carry (the local and
        pipeline ones do; the simulator does not), and there must be a tokenizer."""
        if not getattr(self.executor, "supports_structured_outputs", False):
            return None, f"not supported by the {self.executor.name} executor"
        if not hasattr(self.tokenizer, "_tk"):
            return None, "not supported without the model's tokenizer"
        return StructuredOutputs(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids), ""

    def _build_runtime(self) -> None:
        """(Re)build the KV cache and the scheduler around the loaded model."""
        args = self.args
        num_blocks = args.num_kv_blocks or self.executor.num_kv_blocks(args.kv_cache_bytes(), args.block_size)
        self.kv = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        chunk = args.chunk_size
        if chunk == "auto":  # the tuner's pick for this model on this machine (profiled once, cached)
            from sarathi.sim.autotune import auto_chunk_size

            chunk = self.auto_chunk_size = auto_chunk_size(args, self.model_config,
                                                           num_kv_tokens=num_blocks * args.block_size)
            logger.info("chunk_size auto -> %d", chunk)
        budget = (chunk or args.max_num_batched_tokens if args.scheduler == "sarathi"
                  else args.max_num_batched_tokens)
        self.scheduler = make_scheduler(SchedulerConfig(
            args.scheduler, args.max_num_seqs, budget, args.tile_size, self.max_model_len,
            self.eos_token_ids), self.kv)
        self.executor.init_kv_cache(num_blocks, args.block_size)
        self.executor.reseed(args.seed)

    RUNTIME_FIELDS = ("scheduler", "chunk_size", "max_num_seqs", "max_num_batched_tokens", "tile_size",
                      "block_size", "num_kv_blocks", "kv_cache_memory", "seed", "enable_prefix_caching")

    def reconfigure(self, **changes: Any) -> None:
        """Switch scheduler policy / budget / KV size without reloading the model (sarathi extension,
        used to compare policies on one loaded model). Only allowed while no request is in flight."""
        bad = set(changes) - set(self.RUNTIME_FIELDS)
        if bad:
            raise ValueError(f"reconfigure: cannot change {sorted(bad)}; allowed: {self.RUNTIME_FIELDS}")
        if self.has_unfinished_requests():
            raise RuntimeError("reconfigure: requests are still running")
        args = replace(self.args, **changes)
        args.check()
        self.args = args
        self._build_runtime()
        if self.tracer is not None:
            self.tracer.instant("reconfigure", {k: str(v) for k, v in changes.items()})

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    def shutdown(self) -> None:
        """Stop the executor (pipeline ranks) and write the trace file, if any. Idempotent."""
        try:
            self.executor.shutdown()
        finally:
            if self._trace_finalizer is not None:
                self._trace_finalizer()  # writes once; write_trace() can write again

    # ---- tracing (--trace) ------------------------------------------------------------------
    def _init_trace(self, path: str | None) -> None:
        """A ``Tracer`` for ``--trace``: the executor records its own spans (pipeline stages) or the
        engine records one per step. The file is written by ``shutdown()``, ``write_trace()`` and, as a
        safety net, when the engine is garbage collected or the interpreter exits (weakref.finalize)."""
        self.tracer: Tracer | None = None
        self._engine_traces_steps = False
        self._trace_finalizer: weakref.finalize | None = None
        if not path:
            return
        tracer = Tracer(path, clock=time.perf_counter)  # a pipeline's stages: perf_counter on every rank
        self._engine_traces_steps = not self.executor.set_tracer(tracer)
        if self._engine_traces_steps:  # steps on the engine's clock (virtual under the simulator)
            tracer.clock, tracer.base = self.clock, self.clock()
            tracer.process = f"sarathi engine ({self.executor.name} executor)"
            n = self.executor.max_in_flight
            tracer.tracks = {i: "steps" if n == 1 else f"steps, in-flight lane {i}" for i in range(n)}
        self.tracer = tracer
        self._trace_finalizer = weakref.finalize(self, tracer.write)

    def write_trace(self) -> str | None:
        """Write the trace file now (it is rewritten, with later steps, by every later write); returns
        its path, or None without ``--trace``."""
        return None if self.tracer is None else str(self.tracer.write())

    # ---- requests ---------------------------------------------------------------------------
    @property
    def groups(self) -> dict[str, RequestGroup]:
        """Requests added and not finished yet, by id."""
        return self.output.groups

    def make_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                     arrival_time: float | None = None) -> RequestGroup:
        """Validate and tokenize a request without queueing it (raises InvalidArgument naming the field)."""
        return self.input.make_group(request_id, prompt, params, arrival_time)

    def add_group(self, group: RequestGroup) -> None:
        if group.request_id in self.output.groups:
            raise InvalidArgument("request_id", f"request_id: {group.request_id!r} is already in use")
        self.output.add(group)
        constraints = group.constraints or [None] * len(group.seqs)
        for s, c in zip(group.seqs, constraints, strict=True):
            self.scheduler.add_request(s, c)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        self.add_group(self.make_request(request_id, prompt, params, arrival_time))

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            group = self.output.groups.get(rid)
            if group is None:
                continue
            group.aborted = True
            for s in group.seqs:
                self.scheduler.finish_request(s, RequestStatus.FINISHED_ABORTED)
            self.output.remove(group)

    def has_unfinished_requests(self) -> bool:
        """True while a request is queued or running, or a plan is in flight (it must be collected to
        release its blocks)."""
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    def get_num_unfinished_requests(self) -> int:
        return len(self.output.groups)

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Keep up to ``executor.max_in_flight`` plans in flight, collect the oldest one, and return the
        (cumulative) output of every request it advanced.

        A request that fails inside the step (model or sampler) is finished with ``error`` set in its
        output; the requests batched with it get their tokens as if it had not been there. Once the
        executor has failed for good (``Executor.failure``, e.g. a dead pipeline rank), no plan is
        submitted any more: the plans in flight are collected (their requests fail), then ``step()``
        raises the executor's error.
        """
        if not self._in_flight:
            self.executor.check()
        while len(self._in_flight) < self.executor.max_in_flight and self.executor.failure is None:
            start, t0 = self.clock(), time.perf_counter()
            plan = self.scheduler.schedule()
            if plan.is_empty:
                break
            for sp in plan.seqs:
                g = self.output.groups.get(self.scheduler.requests[sp.req_id].group_id)
                if g is not None and g.metrics.first_scheduled_time is None:
                    g.metrics.first_scheduled_time = start
            try:
                future = self.executor.submit(plan)
            except Exception as e:  # the plan is scheduled: it must come back (failed) to free its blocks
                future = Future()
                future.set_exception(e)
            lane = 0
            if self._engine_traces_steps:  # the lowest trace lane that no plan in flight holds
                busy = {x.lane for x in self._in_flight}
                lane = next(i for i in range(len(busy) + 1) if i not in busy)
            self._in_flight.append(_InFlight(plan, future, start, t0, lane))
        if not self._in_flight:
            return []
        f = self._in_flight.popleft()
        try:
            output = f.future.result()
        except Exception as e:  # any failure is pinned to the request(s) that cause it
            output = self._isolate(f.plan, e)
        if self._engine_traces_steps and self.tracer is not None:
            self.tracer.add_step(f.plan, f.start, self.clock(), f.lane)
        reqs = self.scheduler.requests
        num_failed = len({reqs[rid].group_id for rid in output.failed if rid in reqs})
        updates = self.scheduler.update_from_output(f.plan, output)
        outputs = self._process(updates, self.clock())
        plan = f.plan
        self.stats.num_steps += 1
        self.stats.steps.append(StepRecord(
            self.stats.num_steps, f.start, time.perf_counter() - f.t0, plan.num_prompt_tokens,
            plan.num_decode_tokens, len(plan.seqs), len(plan.preempted), plan.num_recomputed_tokens,
            num_failed))
        return outputs

    def _isolate(self, plan: StepPlan, err: Exception) -> ModelOutput:
        """Find the request(s) that make ``plan`` fail by re-running it in halves.

        Retrying is safe: a sub-plan writes the same K/V slots with the same values, and seeded noise
        depends only on (seed, position). Costs nothing unless a step fails, then O(k log n) runs for k
        failing requests among n. Greedy tokens do not depend on the batch composition, so the innocent
        requests get exactly the tokens they would have got.
        """
        if self.executor.failure is not None:  # nothing runs any more: no culprit to look for
            msg = f"{type(err).__name__}: {err}"
            return ModelOutput(plan.step_id, failed={s.req_id: msg for s in plan.seqs})
        if len(plan.seqs) == 1:
            rid = plan.seqs[0].req_id
            logger.error("step failed for request %s", rid, exc_info=err)
            return ModelOutput(plan.step_id, failed={rid: f"{type(err).__name__}: {err}"})
        logger.warning("step of %d requests failed (%r); retrying in halves to isolate the cause",
                       len(plan.seqs), err)
        out = ModelOutput(plan.step_id)
        mid = len(plan.seqs) // 2
        for part in (plan.seqs[:mid], plan.seqs[mid:]):
            sub = plan.subset(part)
            try:
                got = self.executor.execute(sub)
            except Exception as e:
                got = self._isolate(sub, e)
            out.merge(got)
        return out

    def _process(self, updates: list[SeqUpdate], now: float) -> list[RequestOutput]:
        touched, stopped = self.output.process(updates, now)
        for req in stopped:
            self.scheduler.finish_request(req, RequestStatus.FINISHED_STOPPED)
        outputs = []
        for g in touched:
            if g.error is not None:  # one sequence failed: the whole request stops
                logger.error("request %s failed inside a step and was stopped: %s", g.request_id, g.error)
                for s in g.seqs:
                    self.scheduler.finish_request(s, RequestStatus.FINISHED_ERROR)
            if g.finished:
                g.metrics.finished_time = now
            outputs.append(self.output.output(g))
            if g.finished:
                self.output.remove(g)
        return outputs
