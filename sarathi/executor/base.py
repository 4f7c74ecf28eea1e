"""The executor interface: where a ``StepPlan`` runs (this process, pipeline stages, a cost model).

An executor owns the model and the KV tensors; it sees only plans (plain data keyed by request id),
never a ``Request``. The engine picks one by name (``EngineArgs.executor``) through
``sarathi.executor.get_executor_class`` and never imports a concrete executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from sarathi.scheduler.plan import ModelOutput, StepPlan

if TYPE_CHECKING:
    from sarathi.config import EngineArgs
    from sarathi.model.config import ModelConfig
    from sarathi.trace import Tracer


class ExecutorError(RuntimeError):
    """The executor can run no plan any more (e.g. a pipeline rank died); ``failure`` says why."""


class Executor(ABC):
    """Runs plans, in submission order.

    ``max_in_flight`` is how many plans the executor can hold at once (1 for a single process; the
    number of stages for a pipeline). ``submit`` may return before the plan has run; the engine collects
    outputs in order with ``Future.result()``.
    """

    name = "base"
    max_in_flight = 1

    def __init__(self, args: EngineArgs, model_config: ModelConfig) -> None:
        self.args = args
        self.model_config = model_config

    @abstractmethod
    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes of K and V cache for one block of ``block_size`` tokens, all layers."""

    def num_kv_blocks(self, memory_bytes: int, block_size: int) -> int:
        """How many blocks fit in ``memory_bytes`` (at least one)."""
        return max(1, memory_bytes // self.kv_bytes_per_block(block_size))

    @abstractmethod
    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """(Re)allocate the KV cache; any previous cache and its contents are dropped."""

    @abstractmethod
    def execute(self, plan: StepPlan) -> ModelOutput:
        """Run ``plan`` now and return its output (raises if the step fails)."""

    def submit(self, plan: StepPlan) -> Future[ModelOutput]:
        """Start ``plan``; the default runs it at once. A failure is raised by ``result()``."""
        fut: Future[ModelOutput] = Future()
        try:
            fut.set_result(self.execute(plan))
        except Exception as e:  # delivered to whoever collects the output
            fut.set_exception(e)
        return fut

    def bubble_report(self) -> dict[str, Any] | None:
        """Pipeline executors: per-stage busy/idle seconds and bubble fractions (see pipeline.py)."""
        return None

    @property
    def failure(self) -> str | None:
        """Why this executor can run no plan any more (None while it can). Once set it stays set: the
        engine stops submitting plans and raises from ``step()`` (``check``)."""
        return None

    def check(self) -> None:
        """Raise (an ``ExecutorError``) if ``failure`` is set."""
        if self.failure is not None:
            raise ExecutorError(self.failure)

    def set_tracer(self, tracer: Tracer | None) -> bool:
        """Record this executor's own trace spans (e.g. one track per pipeline stage) into ``tracer``.
        Returns False when it records none: the engine then records one span per step itself."""
        return False

    def reseed(self, seed: int) -> None:
        """Restart the noise of requests that have no seed of their own (on reconfigure)."""
        return None

    def shutdown(self) -> None:
        """Release workers and memory (idempotent)."""
        return None
