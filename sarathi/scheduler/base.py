"""The scheduler: owns every request's lifecycle; policies only decide who computes how much each step.

``schedule()`` picks a batch (the policy), advances ``num_computed_tokens`` for what it picked and
returns a plain-data ``StepPlan``; ``update_from_output(plan, output)`` appends the sampled tokens,
applies the stop conditions that need no text (EOS, stop token ids, max_tokens, context length) and
finishes and frees. Several plans may be in flight at once (pipeline stages): a request waiting for a
sampled token has nothing left to compute, so no policy schedules it until its token is back, while
the next chunk of a prompt may be scheduled behind the previous one (stages run plans in order, so
its KV is written before it is read).

Structured outputs: a constrained sequence comes with a ``TokenConstraint`` (its grammar matcher, see
``sarathi.structured``), kept here beside the request. ``schedule()`` puts the matcher's next-token mask
in the ``SamplingSpec`` of a sequence whose token is due; ``update_from_output`` advances the matcher
once per appended token, so preemption (generated tokens are recomputed, not regenerated) and retried
steps never advance it twice, and finishes the sequence ("stop") when the grammar has ended.

Pure Python, no torch and no clock, so the same policies drive the real engine and a simulator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from sarathi.kv_cache import BlockManager
from sarathi.request import Request, RequestStatus
from sarathi.scheduler.plan import (
    ModelOutput,
    PromptLogprobRows,
    PromptLogprobSpec,
    SamplingSpec,
    SeqPlan,
    StepPlan,
)


@dataclass
class SchedulerConfig:
    """Knobs shared by all policies (vLLM's names).

    ``token_budget`` is the most tokens one step may compute: the chunk size for ``sarathi``,
    ``max_num_batched_tokens`` for the others (which never split a prompt, so a single prompt longer
    than the budget runs alone rather than starving). ``None`` takes the policy's default.
    """

    policy: str = "sarathi"
    max_num_seqs: int = 256
    token_budget: int | None = None
    tile_size: int | None = None
    max_model_len: int = 8192
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"chunk_size / max_num_batched_tokens must be >= 1, got {self.token_budget}")
        if self.tile_size is not None and self.tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {self.tile_size}")


class TokenConstraint(Protocol):
    """A sequence's grammar matcher (``sarathi.structured.GrammarState``)."""

    def next_mask(self) -> bytes | None:
        """The allowed-token bitmask for the next token (None: every token is allowed)."""

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False if it is not allowed."""

    @property
    def terminated(self) -> bool:
        """The grammar has ended (its stop token was accepted)."""


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    is_decode: bool


@dataclass
class SchedulerOutput:
    """A policy's pick for one step, in execution order (decodes first), plus what it preempted."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_recomputed_tokens: int = 0

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


@dataclass
class SeqUpdate:
    """What happened to one sequence when a plan's output came back (for output processing)."""

    request: Request
    token_id: int | None  # None when the step ran a chunk with no token due, or the request failed
    logprobs: tuple[float, int, list[int], list[float]] | None = None
    error: str | None = None
    prompt_logprobs: PromptLogprobRows | None = None  # rows of this chunk, when the request asked for them


class Scheduler(ABC):
    """Owns the waiting queue (FIFO), the running list (in admission order) and the block manager."""

    name = "base"

    def __init__(self, config: SchedulerConfig, kv: BlockManager) -> None:
        self.config = config
        if config.token_budget is None:
            config.token_budget = self.default_budget(config.max_model_len)
        self.kv = kv
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0  # computed tokens thrown away by preemptions, all steps
        self._step_id = 0
        # Requests that want prompt logprobs -> first prompt row not yet scheduled for them. A row, once
        # scheduled, is never asked for again (a recomputed prompt after preemption asks for none), and
        # since a request is preempted only with no plan in flight, every scheduled row came back.
        self._prompt_lp_next: dict[str, int] = {}
        # Structured outputs: the grammar matcher of each constrained sequence, by request id.
        self._grammars: dict[str, TokenConstraint] = {}

    @classmethod
    def default_budget(cls, max_model_len: int) -> int:
        """Token budget when none is configured: whole prompts fit (non-chunking policies)."""
        return max(max_model_len, 16384)

    # ---- queue management -------------------------------------------------------------------
    def add_request(self, req: Request, constraint: TokenConstraint | None = None) -> None:
        """Queue ``req``; ``constraint`` is its grammar matcher when it has structured outputs."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id: {req.request_id!r} is already in use")
        if constraint is not None:
            self._grammars[req.request_id] = constraint
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_request(self, req: Request | str, status: RequestStatus) -> None:
        """Finish ``req`` (idempotent) and free its blocks, exactly once: now, or when the last plan
        that holds it comes back (its K/V writes may still be under way). ``req`` may be an id; an
        unknown or released id is ignored."""
        if isinstance(req, str):
            found = self.requests.get(req)
            if found is None:
                return
            req = found
        if req.finished:
            if req.status is RequestStatus.FINISHED_LENGTH and status is RequestStatus.FINISHED_STOPPED:
                req.status = status  # a stop string in the last token wins over the length limit
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.status = status
        if req.num_in_flight == 0:
            self._release(req)

    def _release(self, req: Request) -> None:
        if req.status is not RequestStatus.FINISHED_ERROR:  # (a failed step may have left bad K/V)
            self.kv.register(req)  # e.g. a chat turn: the next turn's prompt starts with this one
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        self._prompt_lp_next.pop(req.request_id, None)
        self._grammars.pop(req.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Pick this step's batch and commit it: counters advance, the requests are in flight."""
        picked = self._pick()
        self._step_id += 1
        plan = StepPlan(self._step_id, preempted=[r.request_id for r in picked.preempted],
                        num_recomputed_tokens=picked.num_recomputed_tokens)
        for e in picked.scheduled:
            req, n = e.request, e.num_new_tokens
            start = req.num_computed_tokens
            end = start + n
            sample = self._sampling_spec(req) if end == req.num_tokens else None
            plp = (self._prompt_logprob_spec(req, start, end) if req.params.prompt_logprobs is not None
                   else None)
            plan.seqs.append(SeqPlan(req.request_id, req.token_ids[start:end], start, list(req.block_ids),
                                     sample, e.is_decode, plp))
            req.num_computed_tokens = end
            req.num_in_flight += 1
        return plan

    def _prompt_logprob_spec(self, req: Request, start: int, end: int) -> PromptLogprobSpec | None:
        """The prompt rows of positions ``[start, end)`` still owed to ``req``: row p scores prompt token
        p + 1, so rows run up to the prompt's second-to-last position."""
        first = max(start, self._prompt_lp_next.get(req.request_id, 0))
        last = min(end, req.num_prompt_tokens - 1)
        if first >= last:
            return None
        self._prompt_lp_next[req.request_id] = last
        k = req.params.prompt_logprobs or 0
        return PromptLogprobSpec(first, tuple(req.prompt_token_ids[first + 1:last + 1]), k)

    def _sampling_spec(self, req: Request) -> SamplingSpec:
        p = req.params
        banned: tuple[int, ...] = ()
        if p.min_tokens and req.num_output_tokens < p.min_tokens:
            banned = (*p.stop_token_ids, *(() if p.ignore_eos else self.config.eos_token_ids))
        penalized = p.penalized
        # best_of > n ranks the candidates by cumulative logprob: the sampled token's logprob is needed.
        logprobs = p.logprobs if p.logprobs is not None or not p.keeps_best else 0
        grammar = self._grammars.get(req.request_id) if self._grammars else None
        return SamplingSpec(
            p.temperature, p.top_p, p.top_k, p.seed, req.num_output_tokens, logprobs, banned,
            p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p,
            tuple(p.logit_bias.items()) if p.logit_bias else (),
            tuple(req.prompt_token_ids) if p.repetition_penalty != 1.0 else (),
            tuple(req.output_token_ids) if penalized else (),
            grammar.next_mask() if grammar is not None else None)

    def update_from_output(self, plan: StepPlan, output: ModelOutput) -> list[SeqUpdate]:
        """Apply ``output`` of ``plan``: append tokens, stop what must stop, release what finished."""
        updates = []
        for sp in plan.seqs:
            req = self.requests.get(sp.req_id)
            if req is None:
                continue
            req.num_in_flight -= 1
            if req.num_in_flight == 0 and not req.finished and sp.req_id not in output.failed:
                self.kv.register(req)  # its K/V is all written now: full blocks become shareable
            if req.finished:  # aborted (or failed) while in flight: its token, if any, is dropped
                if req.num_in_flight == 0:
                    self._release(req)
                continue
            err = output.failed.get(sp.req_id)
            plp = output.prompt_logprobs.get(sp.req_id) if sp.prompt_logprobs is not None else None
            if err is None and sp.prompt_logprobs is not None and (
                    plp is None or plp.first != sp.prompt_logprobs.first
                    or len(plp.logprobs) != len(sp.prompt_logprobs.targets)):
                err = "the executor returned no (or incomplete) prompt logprobs for this request"
            if err is not None:
                self.finish_request(req, RequestStatus.FINISHED_ERROR)
                updates.append(SeqUpdate(req, None, error=err))
                continue
            tok = output.sampled.get(sp.req_id) if sp.sample is not None else None
            if tok is None:
                updates.append(SeqUpdate(req, None, prompt_logprobs=plp))
                continue
            grammar = self._grammars.get(sp.req_id) if self._grammars else None
            if grammar is not None and not grammar.accept(tok.token_id):
                self.finish_request(req, RequestStatus.FINISHED_ERROR)
                updates.append(SeqUpdate(req, None, error=f"structured output: token {tok.token_id} was "
                                                          "sampled but the grammar does not allow it"))
                continue
            req.token_ids.append(tok.token_id)
            status = self._check_stop(req, tok.token_id)
            if grammar is not None and grammar.terminated:  # the grammar has ended: nothing may follow
                status = RequestStatus.FINISHED_STOPPED
            if status is not None:
                self.finish_request(req, status)
            updates.append(SeqUpdate(req, tok.token_id, tok.logprobs, prompt_logprobs=plp))
        return updates

    def _check_stop(self, req: Request, tok: int) -> RequestStatus | None:
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and tok in self.config.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if tok in p.stop_token_ids:
                req.stop_reason = tok
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @abstractmethod
    def _pick(self) -> SchedulerOutput:
        """The policy: this step's batch. Must not pick a request twice, pick one with nothing to
        compute (``num_uncomputed == 0``: it waits for a token), or exceed the budget or the KV."""

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
        hit = self._prefix_hit(req)
        if hit:  # cached blocks need no new ones, but taking an idle one uses free capacity
            need += self.kv.idle_blocks_in(hit) - min(len(hit), need)
        if not self.running:
            return need <= self.kv.num_free_blocks
        reserve = max(1, self.kv.num_blocks // 100) + len(self.running)
        return need + reserve <= self.kv.num_free_blocks

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Recompute-preemption: free the blocks, forget the KV, requeue at the front. Only for a
        request with no plan in flight (its K/V writes are done)."""
        assert req.num_in_flight == 0
        self.running.remove(req)
        self.kv.register(req)  # with prefix caching its recompute mostly hits its own blocks
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
        requests that are neither picked this step nor in flight, if needed. Returns False if ``req``
        could not get the blocks (it was preempted itself, or every candidate victim is busy)."""
        while not self.kv.can_allocate(req, n):
            victim = next((r for r in reversed(self.running)
                           if id(r) not in taken and r.num_in_flight == 0), None)
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

    def _admit(self, req: Request, n: int, out: SchedulerOutput, taken: set[int]) -> int:
        """Move the head of the waiting queue to running with up to ``n`` tokens scheduled; returns
        how many. With prefix caching its longest cached prefix is taken first: those tokens count as
        computed and cost no budget."""
        assert self.waiting[0] is req
        self.waiting.popleft()
        hit = self._prefix_hit(req)
        if self.kv.enable_prefix_caching and req.num_computed_tokens == 0:
            self.kv.num_query_tokens += req.num_tokens
            self.kv.num_hit_tokens += len(hit) * self.kv.block_size
            self.kv.share(req, hit)
        n = min(n, req.num_uncomputed)
        self.kv.allocate(req, n)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._add(out, taken, req, n)
        return n

    def _prefix_hit(self, req: Request) -> list[int]:
        """Cached blocks ``req`` would take at admission (none when it must compute its prompt rows:
        prompt logprobs need the logits of every prompt token)."""
        if (not self.kv.enable_prefix_caching or req.num_computed_tokens
                or getattr(req.params, "prompt_logprobs", None) is not None):
            return []
        return self.kv.match(req)
