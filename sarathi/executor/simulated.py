"""Runs plans on a cost model instead of a GPU: the simulator is this executor, not a second engine.

The same ``LLMEngine``, schedulers and KV block manager run; ``submit(plan)`` asks
:class:`sarathi.sim.costmodel.CostModel` how long the plan takes on each pipeline stage, places it on
the stages' timelines (a stage starts a plan once the previous stage has finished it and it has
finished the previous plan), and returns a future that moves the engine's virtual clock to the plan's
completion when the engine collects it. Every sequence that samples gets the same made-up token, one
that is not EOS, so requests run to ``max_tokens``.

Settings that ``EngineArgs`` does not carry (hardware, TP/PP degrees, the clock) are bound to a subclass
with :meth:`SimulatedExecutor.bind`; ``--executor simulated`` alone uses the defaults below.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sarathi.executor.base import Executor
from sarathi.scheduler.plan import ModelOutput, SampledToken, StepPlan
from sarathi.sim.clock import VirtualClock
from sarathi.sim.costmodel import CostModel, StepCost
from sarathi.sim.hardware import HardwareSpec, get_hardware

if TYPE_CHECKING:
    from sarathi.config import EngineArgs
    from sarathi.model.config import ModelConfig


@dataclass
class SimStep:
    """One simulated plan: when it entered and left each stage, and what it held."""

    step_id: int
    stage_start: list[float]
    stage_end: list[float]
    num_prompt_tokens: int
    num_decode_tokens: int
    num_seqs: int
    cost: StepCost
    decode_s: float  # what the decodes added to the step (see ``CostModel.plan_cost``)

    @property
    def start(self) -> float:
        return self.stage_start[0]

    @property
    def end(self) -> float:
        return self.stage_end[-1]


class _SimFuture(Future):  # type: ignore[type-arg]
    """Already resolved; collecting it moves the virtual clock to the plan's completion time."""

    def __init__(self, output: ModelOutput, done_at: float, clock: VirtualClock | None) -> None:
        super().__init__()
        self.set_result(output)
        self.done_at, self.clock = done_at, clock

    def result(self, timeout: float | None = None) -> Any:
        if self.clock is not None:
            self.clock.advance_to(self.done_at)
        return super().result(timeout)


def resolve_dtype(args_dtype: str, checkpoint_dtype: str | None, gpu: bool) -> str:
    """The dtype the simulated device runs in, mirroring ``EngineArgs.torch_dtype``'s ``auto`` rule:
    a GPU keeps a 16-bit checkpoint's type (others run in float16, as in the paper); a CPU (the
    ``local`` profile) runs bfloat16 where this CPU has bf16 instructions, float32 elsewhere."""
    from sarathi.config import cpu_has_fast_bf16

    name = {"half": "float16", "float": "float32"}.get(args_dtype, args_dtype)
    if name != "auto":
        return name
    if gpu:
        return checkpoint_dtype if checkpoint_dtype in ("bfloat16", "float16") else "float16"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


class SimulatedExecutor(Executor):
    name = "simulated"
    # Bound per engine by ``bind``; these defaults serve ``--executor simulated``.
    hardware: HardwareSpec | str = "a100-80gb"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int | None = None  # None: EngineArgs.pipeline_parallel_size, else 1
    clock: VirtualClock | None = None  # None: keep a private timeline (the engine uses wall time)
    keep_steps: bool = True

    @classmethod
    def bind(cls, **settings: Any) -> type[SimulatedExecutor]:
        """A subclass with ``settings`` (any of the class attributes above) fixed."""
        unknown = set(settings) - {"hardware", "tensor_parallel_size", "pipeline_parallel_size", "clock",
                                   "keep_steps"}
        if unknown:
            raise ValueError(f"simulated executor: unknown settings {sorted(unknown)}")
        return type("BoundSimulatedExecutor", (cls,), settings)

    def __init__(self, args: EngineArgs, model_config: ModelConfig) -> None:
        super().__init__(args, model_config)
        hw = get_hardware(self.hardware)
        pp = self.pipeline_parallel_size or getattr(args, "pipeline_parallel_size", None) or 1
        self.dtype = resolve_dtype(args.dtype, model_config.torch_dtype, hw.is_gpu)
        self.cost = CostModel(model_config, hw, self.dtype, self.tensor_parallel_size, pp)
        self.max_in_flight = pp
        self._own_clock = self.clock or VirtualClock()
        self._stage_free = [0.0] * pp
        self.steps: list[SimStep] = []
        eos = set(model_config.eos_token_ids)
        self.token_id = next(t for t in range(model_config.vocab_size - 1, -1, -1) if t not in eos)
        self.block_size = args.block_size
        self.num_blocks = 0

    def kv_bytes_per_block(self, block_size: int) -> int:
        return self.cost.kv_bytes_per_token() * block_size

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size  # nothing to allocate

    def _output(self, plan: StepPlan, cost: StepCost) -> ModelOutput:
        tok = SampledToken(self.token_id)  # shared: nobody mutates a SampledToken
        out = ModelOutput(plan.step_id, {s.req_id: tok for s in plan.seqs if s.sample is not None})
        out.execute_time = cost.total_s
        return out

    def _place(self, plan: StepPlan) -> tuple[ModelOutput, float]:
        """Put ``plan`` on the stage timelines from now; returns its output and completion time."""
        cost, decode_s = self.cost.plan_cost(plan, decode_share=self.keep_steps)
        t = self._own_clock.now
        starts, ends = [], []
        for i, dt in enumerate(cost.stage_s):
            t = max(t, self._stage_free[i])
            starts.append(t)
            t += dt
            ends.append(t)
            self._stage_free[i] = t
        if self.keep_steps:
            self.steps.append(SimStep(plan.step_id, starts, ends, plan.num_prompt_tokens,
                                      plan.num_decode_tokens, len(plan.seqs), cost, decode_s))
        return self._output(plan, cost), t

    def submit(self, plan: StepPlan) -> Future[ModelOutput]:
        out, done = self._place(plan)
        return _SimFuture(out, done, self._own_clock)

    def execute(self, plan: StepPlan) -> ModelOutput:
        out, done = self._place(plan)
        self._own_clock.advance_to(done)
        return out
