"""The paper's baselines, on the same engine and model so that only the policy differs.

None of them splits a prompt: a request is admitted with all of its uncomputed tokens at once.
"""

from __future__ import annotations

from sarathi.request import RequestStatus
from sarathi.scheduler.base import Scheduler, SchedulerOutput


class _WholePromptScheduler(Scheduler):
    def _admit_whole_prompts(self, out: SchedulerOutput, taken: set[int], budget: int) -> None:
        """Admit waiting requests FIFO while whole prompts fit the budget, max_num_seqs and free KV
        (beyond the admission reserve, see ``Scheduler._can_admit``).

        A prompt longer than the whole budget is admitted when the step is otherwise empty, so it
        runs alone instead of waiting forever.
        """
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = req.num_uncomputed
            if n > budget and out.scheduled:
                break
            if not self._can_admit(req):
                break
            budget -= self._admit(req, n, out, taken)

    def _decode_all(self, out: SchedulerOutput, taken: set[int]) -> None:
        for req in list(self.running):
            n = req.num_uncomputed
            if req.status == RequestStatus.RUNNING and id(req) not in taken and n > 0:
                if self._reserve(req, n, out, taken):
                    self._add(out, taken, req, n)


class VllmScheduler(_WholePromptScheduler):
    """vLLM's original policy (prefill-prioritizing): if any waiting prompt can be admitted, run a
    prefill-only step of whole prompts (up to ``max_num_batched_tokens``); otherwise a decode-only step.
    Running decodes stall while new prompts are prefilled: the "generation stalls" Sarathi-Serve fixes.
    """

    name = "vllm"

    def _pick(self) -> SchedulerOutput:
        out = SchedulerOutput()
        taken: set[int] = set()
        self._admit_whole_prompts(out, taken, self.config.token_budget)
        if not out.scheduled:
            self._decode_all(out, taken)
        return out


class OrcaScheduler(_WholePromptScheduler):
    """Orca's iteration-level batching: every running decode plus whole new prompts in the same step,
    up to ``max_num_seqs`` requests (and ``max_num_batched_tokens`` tokens). No chunking, so a long
    prompt makes the whole iteration, and every decode in it, slow."""

    name = "orca"

    def _pick(self) -> SchedulerOutput:
        out = SchedulerOutput()
        taken: set[int] = set()
        self._decode_all(out, taken)
        self._admit_whole_prompts(out, taken, self.config.token_budget - out.num_tokens)
        return out


class RequestLevelScheduler(_WholePromptScheduler):
    """FasterTransformer-style static batching: a batch of up to ``max_num_seqs`` requests is prefilled
    together, then decoded together; new requests start only when the whole batch has finished."""

    name = "request_level"

    def _pick(self) -> SchedulerOutput:
        out = SchedulerOutput()
        taken: set[int] = set()
        if not self.running:
            self._admit_whole_prompts(out, taken, self.config.token_budget)
        else:
            self._decode_all(out, taken)
        return out
