"""A user request as the engine front end sees it: ``n`` sequences sharing one prompt and one id."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sarathi.outputs import RequestMetrics
from sarathi.request import Request
from sarathi.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


@dataclass
class RequestGroup:
    """The sequences (``Request``s, owned by the scheduler once added) of one request id."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Request]
    metrics: RequestMetrics
    aborted: bool = False
    error: str | None = None  # why the group failed inside a step, if it did
    # Structured outputs: one grammar matcher per sequence (``sarathi.structured.GrammarState``), handed
    # to the scheduler with its sequence; empty when the request is not constrained.
    constraints: list[Any] = field(default_factory=list, repr=False)

    @property
    def params(self) -> SamplingParams:
        return self.seqs[0].params

    @property
    def finished(self) -> bool:
        seqs = self.seqs
        return seqs[0].finished if len(seqs) == 1 else all(s.finished for s in seqs)
