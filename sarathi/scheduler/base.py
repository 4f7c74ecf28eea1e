"""The scheduler interface: policies decide, each step, how many tokens every request computes.

Pure Python, no torch and no clock, so the same policies drive the real engine and a simulator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from sarathi.kv_cache import BlockManager
from sarathi.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    """Knobs shared by all policies (vLLM's names).

    ``token_budget`` is the most tokens one step may compute: the chunk size for ``sarathi``,
    ``max_num_batched_tokens`` for the others (which never split a prompt, so a single prompt longer
    than the budget runs alone rather than starving).
    """

    policy: str = "sarathi"
    max_num_seqs: int = 256
    token_budget: int = 512
    tile_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.token_budget < 1:
            raise ValueError(f"chunk_size / max_num_batched_tokens must be >= 1, got {self.token_budget}")
        if self.tile_size is not None and self.tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {self.tile_size}")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    is_decode: bool


@dataclass
class SchedulerOutput:
    """One step's batch, in execution order (decodes first), plus what was preempted to make room."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_recomputed_tokens: int = 0  # computed tokens whose KV the preemptions above threw away

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_decode_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled if s.is_decode)

    @property
    def num_prompt_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler(ABC):
    """Owns the waiting queue (FIFO) and the running list (in admission order)."""

    name = "base"

    def __init__(self, config: SchedulerConfig, kv: BlockManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0  # computed tokens thrown away by preemptions, all steps

    # ---- queue management -------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish_request(self, req: Request, status: RequestStatus) -> None:
        """Remove ``req`` from whichever queue holds it and free its blocks (exactly once)."""
        if req.finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @abstractmethod
    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch. Must not schedule a request twice or exceed the budget/KV."""

    # ---- helpers shared by policies ---------------------------------------------------------
    def _can_admit(self, req: Request) -> bool:
        """Admission control against preemption thrash: admit ``req`` only if its whole uncomputed
        prompt plus its first generated token fit in the free blocks, keeping back a reserve of a 1%
        watermark plus one block per running sequence (each running decode may need a new block
        within the next ``block_size`` steps). With nothing running it only has to fit.

        Without this, a new prompt takes whatever is free, the running decodes then run out of
        blocks and preempt it, and its computed chunks are thrown away, again and again.
        """
        need = self.kv.blocks_needed(req, req.num_uncomputed + 1)
        if not self.running:
            return need <= self.kv.num_free_blocks
        reserve = max(1, self.kv.num_blocks // 100) + len(self.running)
        return need + reserve <= self.kv.num_free_blocks

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Recompute-preemption: free the blocks, forget the KV, requeue at the front."""
        self.running.remove(req)
        self.kv.free(req)
        self.num_recomputed_tokens += req.num_computed_tokens
        out.num_recomputed_tokens += req.num_computed_tokens
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        out.preempted.append(req)

    def _reserve(self, req: Request, n: int, out: SchedulerOutput, taken: set[int]) -> bool:
        """Allocate KV for ``n`` new tokens of running ``req``, preempting the most recently admitted
        unscheduled requests if needed. Returns False if ``req`` itself had to be preempted."""
        while not self.kv.can_allocate(req, n):
            victim = next((r for r in reversed(self.running) if id(r) not in taken), None)
            if victim is None:
                return False
            self._preempt(victim, out)
            if victim is req:
                return False
        self.kv.allocate(req, n)
        return True

    def _add(self, out: SchedulerOutput, taken: set[int], req: Request, n: int) -> None:
        out.scheduled.append(ScheduledRequest(req, n, req.is_decode and n == 1))
        taken.add(id(req))

    def _admit(self, req: Request, n: int, out: SchedulerOutput, taken: set[int]) -> None:
        """Move the head of the waiting queue to running with ``n`` tokens scheduled."""
        assert self.waiting[0] is req
        self.waiting.popleft()
        self.kv.allocate(req, n)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._add(out, taken, req, n)
