"""What the engine returns: vLLM-shaped ``RequestOutput`` / ``CompletionOutput``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-n).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token, aligned with prompt_token_ids: None for the first (nothing precedes it),
# then token id -> Logprob (the prompt token itself plus the top-n alternatives).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """Cumulative state of one request: text and token ids generated so far.

    ``error`` is set (and ``finished`` is True) when this request failed inside an engine step; the
    requests that were batched with it are not affected. ``prompt_logprobs`` (when asked for) is
    complete from the first output that carries a generated token on. ``num_generated_tokens``
    counts the tokens of every sequence generated, including ``best_of`` candidates not returned.
    With ``best_of > n``, ``outputs`` are the ``n`` sequences with the highest cumulative logprob so
    far, best first (``index`` is the rank).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    num_generated_tokens: int = 0
