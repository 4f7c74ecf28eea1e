"""SARATHI: decode-maximal batching with chunked prefills (and Sarathi-Serve's stall-free order)."""

from __future__ import annotations

from sarathi.request import RequestStatus
from sarathi.scheduler.base import Scheduler, SchedulerOutput

_RUNNING = RequestStatus.RUNNING


class SarathiScheduler(Scheduler):
    """Each step: (1) every running decode, (2) the next chunk of prompts already in progress,
    (3) new prompts, until ``chunk_size`` tokens, ``max_num_seqs`` or free KV blocks run out (a new
    prompt is admitted only when all of it fits beside a reserve for the running decodes).

    Decodes ride on the prompt chunk's weight reads, so they are nearly free. With ``tile_size`` the
    budget is rounded down to a tile multiple: a full step (decodes + chunk) then fills whole GEMM tiles
    instead of spilling a few tokens into an extra, mostly empty tile.
    """

    name = "sarathi"

    @classmethod
    def default_budget(cls, max_model_len: int) -> int:
        return 512  # Sarathi-Serve's budget for strict latency targets; chunk_size overrides it

    @property
    def budget(self) -> int:
        b, tile = self.config.token_budget, self.config.tile_size
        return max(tile, b - b % tile) if tile else b

    def _pick(self) -> SchedulerOutput:
        out = SchedulerOutput()
        taken: set[int] = set()
        budget = self.budget
        running = list(self.running)  # a copy: _reserve may preempt (remove) requests
        # (1) decodes first: they must never stall behind prompt work. (Inlined ``is_decode`` and
        # status checks: with pipeline parallelism most running requests are in flight, waiting for a
        # token, and this loop passes over every one of them each step.)
        for req in running:
            if budget == 0:
                break
            n = req.num_computed_tokens
            if (n == len(req.token_ids) - 1 and n >= req.num_prompt_tokens and req.status is _RUNNING
                    and self._reserve(req, 1, out, taken)):
                self._add(out, taken, req, 1)
                budget -= 1
        # (2) continue prompts already admitted (partly computed, or recomputing after preemption).
        for req in running:
            if budget == 0:
                break
            if (req.num_computed_tokens == len(req.token_ids) or req.status is not _RUNNING
                    or id(req) in taken):
                continue  # (a request with nothing to compute is waiting for its sampled token)
            if self.kv.max_new_tokens(req) == 0 and not self._reserve(req, 1, out, taken):
                continue  # it was preempted itself: nothing newer was left to evict
            n = min(req.num_uncomputed, budget, self.kv.max_new_tokens(req))
            self.kv.allocate(req, n)
            self._add(out, taken, req, n)
            budget -= n
        # (3) admit new requests in arrival order.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not self._can_admit(req):
                break  # FIFO: later requests wait too, so a large prompt is not starved
            budget -= self._admit(req, min(req.num_uncomputed, budget), out, taken)
        return out
