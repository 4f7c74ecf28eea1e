"""Pipeline parallelism: the decoder layers split into N contiguous stages, one process (rank) each.

Rank 0 is the engine's own process: it schedules, runs stage 0 (embeddings + its layers) inside
``submit`` and receives the sampled tokens. Ranks 1..N-1 are worker processes started here
(``python -m sarathi.executor.pipeline_worker``, on 127.0.0.1 only) that loop: receive a message from
the previous rank, run their layers, pass it on; the last rank also holds the final norm, LM head and
sampler and sends the ``ModelOutput`` back to rank 0. All traffic is torch.distributed point-to-point
(gloo on CPU, NCCL on CUDA): a small int64 header, then the activations, then the pickled plan (plain
data), so every rank builds the same attention metadata from the same plan.

Why rank 0 is a stage and not a separate driver: the engine thread computes stage 0 of micro-batch
i+1 while stage 1 computes micro-batch i, so one process per stage is enough and nothing waits on a
thread handoff. Nothing blocks on a send (all sends are ``isend``; their buffers are kept until done),
so the only blocking calls are receives: workers wait for their predecessor, rank 0 for the last rank.
A receive on rank 0 gives up after ``pipeline_timeout`` seconds (a hung rank) or as soon as a peer's
socket closes (a dead rank), and a spawned rank whose process has exited is noticed before the next plan
(``failure`` polls them); the executor is then broken for good (``failure`` says why) and every later
call raises ``PipelineError``.
Workers wait for rank 0 without a deadline, and exit when its connection closes.

Every plan submitted produces exactly one message back from the last rank, in order, even when a
stage fails on it (the failure travels down the pipeline in place of the activations), so outputs are
matched to plans by order alone.

This module is the engine's side (``PipelineExecutor``, bubble accounting); the ranks' side (stage
runner, message link, process groups, the worker loop) is in ``pipeline_stage``.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import pickle
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sarathi.executor.base import Executor
from sarathi.executor.pipeline_stage import (
    INIT_KV,
    OUTPUT,
    PLAN,
    RESEED,
    SHUTDOWN,
    PipelineError,
    StageTiming,
    _Link,
    _stage_device,
    _StageRunner,
    _torchrun_env,
    _torchrun_store,
    make_group,
    stage_ranges,
    worker_main,
)
from sarathi.scheduler.plan import ModelOutput, StepPlan
from sarathi.trace import chrome_trace

if TYPE_CHECKING:
    from sarathi.config import EngineArgs
    from sarathi.model.config import ModelConfig
    from sarathi.trace import Tracer

__all__ = ["PipelineError", "PipelineExecutor", "StageTiming", "chrome_trace", "stage_ranges", "worker_main"]

logger = logging.getLogger("sarathi")

@dataclass
class StageStats:
    compute_s: float = 0.0
    comm_s: float = 0.0
    micro_batches: int = 0


@dataclass
class BubbleStats:
    """Per-stage busy time against the wall time during which the pipeline had work in flight."""

    stages: list[StageStats]
    pending_s: float = 0.0  # wall time with at least one plan in flight
    recent: deque[StageTiming] = field(default_factory=lambda: deque(maxlen=100_000))

    def report(self) -> dict[str, Any]:
        per_stage = []
        for i, s in enumerate(self.stages):
            idle = max(0.0, self.pending_s - s.compute_s - s.comm_s)
            per_stage.append({"stage": i, "compute_s": s.compute_s, "comm_s": s.comm_s, "idle_s": idle,
                              "micro_batches": s.micro_batches,
                              "bubble_fraction": idle / self.pending_s if self.pending_s else 0.0})
        return {"pending_s": self.pending_s, "bubble_s": sum(p["idle_s"] for p in per_stage),
                "stages": per_stage}


class _PlanFuture(Future):  # type: ignore[type-arg]
    """Resolved lazily: ``result()`` receives outputs from the last rank, in order, until its own."""

    def __init__(self, executor: PipelineExecutor) -> None:
        super().__init__()
        self._executor = executor

    def result(self, timeout: float | None = None) -> ModelOutput:
        while not self.done():
            self._executor._collect_one()
        return super().result(timeout)


class PipelineExecutor(Executor):
    """Rank 0 of an N-stage pipeline, behind the ``Executor`` interface; holds up to N plans."""

    name = "pipeline"
    # The last rank computes prompt logprobs and applies grammar masks, which travel in the plan
    # (SamplingSpec.token_bitmask). A request is never in two plans in flight, so each mask is built
    # after the request's previous token came back.
    supports_prompt_logprobs = True
    supports_structured_outputs = True

    def __init__(self, args: EngineArgs, model_config: ModelConfig) -> None:
        super().__init__(args, model_config)
        pp = args.pipeline_parallel_size
        try:
            self.ranges = stage_ranges(model_config.num_hidden_layers, pp, args.pipeline_stages)
        except ValueError as e:
            from sarathi.errors import InvalidArgument

            field_name = "pipeline_stages" if args.pipeline_stages else "pipeline_parallel_size"
            raise InvalidArgument(field_name, str(e)) from None
        self.max_in_flight = pp
        self.world = pp
        self.timeout = float(args.pipeline_timeout)
        self.device = _stage_device(args, 0)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.procs: list[subprocess.Popen[bytes]] = []
        # (step id, future, stage 0's timing) per plan in flight, oldest first
        self._pending: deque[tuple[int, _PlanFuture, StageTiming]] = deque()
        self._broken: str | None = None
        self._closed = False
        self.stats = BubbleStats([StageStats() for _ in range(pp)])
        self._pending_since: float | None = None
        self.tracer: Tracer | None = None
        launched = _torchrun_env()
        if launched is not None:  # torchrun started every rank with this same command
            rank, world = launched
            if world != pp:
                raise PipelineError(f"pipeline: torchrun started {world} ranks for "
                                    f"pipeline_parallel_size {pp}")
            store = _torchrun_store(rank, world)
            if rank != 0:  # a stage, not the engine: serve the pipeline until rank 0 shuts it down
                worker_main(rank, world, store, args, model_config, self.ranges)
                raise SystemExit(0)
        else:
            store = dist.TCPStore("127.0.0.1", 0, pp, True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=max(60, self.timeout)))
        self.store = store
        try:
            for rank in range(1, pp if launched is None else 1):
                self.procs.append(self._spawn(rank, store.port))
            self.stage = _StageRunner(args, model_config, self.ranges[0], self.device)
            self.dtype = self.stage.dtype
            self.pg = make_group(self.backend, store, 0, pp, datetime.timedelta(seconds=self.timeout))
            link_dev = self.device if self.backend == "nccl" else torch.device("cpu")
            self.link = _Link(self.pg, model_config.hidden_size, self.dtype, link_dev, 2 * pp + 2)
            self._wait_ready(store)
        except Exception as e:
            self._kill_workers()
            if isinstance(e, PipelineError):
                raise
            raise PipelineError(f"pipeline: could not start {pp} stages: {e}{self._rank_report()}") from e
        atexit.register(self.shutdown)
        logger.info("pipeline: %d stages over layers %s (%s)", pp, self.ranges, self.backend)

    # ---- start-up ---------------------------------------------------------------------------
    def _spawn(self, rank: int, port: int) -> subprocess.Popen[bytes]:
        """A worker process running ``pipeline_worker`` (not multiprocessing: a user's script without a
        ``__main__`` guard is then not imported again in every rank)."""
        env = dict(os.environ, SARATHI_PP_RANK=str(rank), SARATHI_PP_WORLD=str(self.world),
                   SARATHI_PP_PORT=str(port))
        proc = subprocess.Popen([sys.executable, "-m", "sarathi.executor.pipeline_worker"],
                                stdin=subprocess.PIPE, env=env)
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps((self.args, self.model_config, self.ranges)))
        proc.stdin.close()
        return proc

    def _wait_ready(self, store: Any) -> None:
        """Every worker sets ``ready/<rank>`` once its layers are loaded (or an error text)."""
        deadline = time.monotonic() + max(300.0, self.timeout)  # loading a big checkpoint takes a while
        for rank in range(1, self.world):
            key = f"ready/{rank}"
            while not store.check([key]):
                gone = bool(self.procs) and self.procs[rank - 1].poll() is not None
                if gone or time.monotonic() > deadline:
                    raise PipelineError(f"pipeline: rank {rank} did not start{self._rank_report()}")
                time.sleep(0.02)
            msg = store.get(key)
            msg = msg.decode() if isinstance(msg, bytes) else msg
            if msg != "ok":
                raise PipelineError(f"pipeline: rank {rank} failed to start: {msg}")

    # ---- the Executor interface ---------------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        """Per rank: each stage holds its own layers' KV, so the largest stage sets the budget."""
        cfg = self.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        layers = max(e - s for s, e in self.ranges)
        return 2 * layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self._check()
        self.stage.init_kv_cache(num_blocks, block_size)
        self._send(INIT_KV, None, (num_blocks, block_size))
        self.reset_stats()  # a new runtime (e.g. another policy on reconfigure): bubbles counted afresh

    def reseed(self, seed: int) -> None:
        self._check()
        self.stage.reseed(seed)
        self._send(RESEED, None, seed)

    def execute(self, plan: StepPlan) -> ModelOutput:
        return self.submit(plan).result()

    def submit(self, plan: StepPlan) -> Future[ModelOutput]:
        self._check()
        fut = _PlanFuture(self)
        t0 = time.perf_counter()
        if self._pending_since is None:
            self._pending_since = t0
        err = None
        act: torch.Tensor | None = None
        try:
            res = self.stage.run(plan, None)
            assert isinstance(res, torch.Tensor)
            act = res
        except Exception as e:  # travels down the pipeline in place of the activations
            err = f"{type(e).__name__}: {e}"
        t1 = time.perf_counter()
        timing = StageTiming(0, plan.step_id, plan.num_prompt_tokens, plan.num_decode_tokens, None, (t0, t1),
                             (t1, t1), len(plan.seqs))
        self._send(PLAN, act, (plan, [], err), timing)
        self._pending.append((plan.step_id, fut, timing))
        return fut

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._broken is None and hasattr(self, "link"):
            try:  # (not waited for: the ranks that do not exit in time are killed below)
                self.link.send(1, SHUTDOWN, None, None)
            except Exception:  # a rank already gone: killed below
                pass
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill_workers()
        for _, fut, _ in self._pending:
            if not fut.done():
                fut.set_exception(PipelineError("pipeline: shut down with this plan in flight"))
        self._pending.clear()

    # ---- bubble accounting --------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.stats = BubbleStats([StageStats() for _ in range(self.world)])
        self._pending_since = time.perf_counter() if self._pending else None

    def bubble_report(self) -> dict[str, Any]:
        """Per stage: compute and communication seconds, idle seconds and bubble fraction (idle / wall
        time with work in flight); ``bubble_s``: the pipeline's total idle stage-seconds. Counted since
        the last ``init_kv_cache`` (a reconfiguration), up to the last micro-batch collected."""
        rep = self.stats.report()
        rep["layers"] = self.ranges
        return rep

    def set_tracer(self, tracer: Tracer | None) -> bool:
        """Record every stage's receive / compute / send of every micro-batch into ``tracer`` (on
        perf_counter, one track per stage)."""
        self.tracer = tracer
        if tracer is not None:
            tracer.process = f"sarathi pipeline PP={self.world}"
            tracer.tracks = {i: f"stage {i} (layers {s}-{e - 1})" for i, (s, e) in enumerate(self.ranges)}
        return True

    def _record(self, timings: list[StageTiming]) -> None:
        for t in timings:
            s = self.stats.stages[t.stage]
            s.compute_s += t.compute[1] - t.compute[0]
            s.comm_s += (t.recv[1] - t.recv[0] if t.recv else 0.0) + (t.send[1] - t.send[0])
            s.micro_batches += 1
            self.stats.recent.append(t)
        if self.tracer is not None:
            self.tracer.add_stage_timings(timings)

    # ---- internals ----------------------------------------------------------------------------
    def _send(self, kind: int, act: torch.Tensor | None, obj: Any, timing: StageTiming | None = None) -> None:
        try:
            self.link.send(1, kind, act, obj)
        except Exception as e:
            self._fail(e)
        if timing is not None:
            timing.send = (timing.send[0], time.perf_counter())

    def _collect_one(self) -> None:
        """Receive the next output from the last rank and resolve the oldest plan's future."""
        self._check()
        try:
            kind, _, obj, _ = self.link.recv(self.world - 1)
        except Exception as e:
            self._fail(e)
        step_id, fut, own = self._pending.popleft()
        out, timings, err = obj
        self._record([own, *timings])
        if self._pending_since is not None:  # counted at every collection, so a busy pipeline that never
            now = time.perf_counter()  # drains still reports current bubbles
            self.stats.pending_s += now - self._pending_since
            self._pending_since = now if self._pending else None
        if err is not None:
            fut.set_exception(RuntimeError(f"pipeline stage failed on step {step_id}: {err}"))
        else:
            assert kind == OUTPUT and out.step_id == step_id, "pipeline outputs out of order"
            fut.set_result(out)

    @property
    def failure(self) -> str | None:
        """Why no plan can run any more (a rank lost, or shut down), else None. Polls the spawned ranks
        (a waitpid each, microseconds), so a rank that died while the pipeline was idle is noticed
        before the next plan is sent to it."""
        if self._broken is None and not self._closed:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                self._break(f"pipeline: a pipeline rank exited{self._rank_report()}")
        if self._broken is not None:
            return self._broken
        return "pipeline: the executor was shut down" if self._closed else None

    def check(self) -> None:
        """Raise ``PipelineError`` if ``failure`` is set (polling the ranks first)."""
        if self.failure is not None:
            self._check()

    def _check(self) -> None:
        if self._broken is not None:
            raise PipelineError(self._broken)
        if self._closed:
            raise PipelineError("pipeline: the executor was shut down")

    def _fail(self, cause: BaseException) -> None:
        """A receive or send failed: a rank is dead or hung. Break for good, fail every plan in flight."""
        time.sleep(0.2)  # let a crashing rank finish exiting, so the report names it
        msg = (f"pipeline: lost contact with the pipeline ranks ({cause}); no answer within "
               f"{self.timeout:g} s or a connection closed{self._rank_report()}")
        raise self._break(msg) from cause

    def _break(self, msg: str) -> PipelineError:
        """Mark the executor broken for good: fail every plan in flight, kill the remaining ranks."""
        self._broken = msg
        err = PipelineError(msg)
        for _, fut, _ in self._pending:
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self._kill_workers()
        return err

    def _rank_report(self) -> str:
        dead = [f"rank {i + 1} (layers {self.ranges[i + 1][0]}-{self.ranges[i + 1][1] - 1}) exited with code "
                f"{p.returncode}" for i, p in enumerate(self.procs) if p.poll() is not None]
        if dead:
            return "; " + ", ".join(dead)
        if not self.procs:
            return " (ranks started by torchrun)"
        return "; every rank is still running (a hung rank?)"

    def _kill_workers(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
                pass
