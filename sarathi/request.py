"""A request is a list of token ids and a counter of how many of them are (or are being) put in the KV cache.

There is no prefill phase or decode phase: each step the scheduler lets ``num_computed_tokens`` catch up
by some amount (a prompt chunk, or 1 for a decode). When it reaches ``num_tokens`` the model samples a
new token, which is appended, and the request needs one more step. Preemption by recompute just resets
the counter to 0 (prompt and generated tokens are recomputed like a longer prompt).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sarathi.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # failed inside a step (pinned to this request; its batch-mates go on)

    @property
    def finished(self) -> bool:
        return self is not RequestStatus.WAITING and self is not RequestStatus.RUNNING


_WAITING, _RUNNING = RequestStatus.WAITING, RequestStatus.RUNNING


@dataclass(eq=False)
class Request:
    """One sequence to generate (a request with ``n > 1`` becomes n of these): scheduling state only.

    The scheduler is its only writer. Invariants: ``0 <= num_computed_tokens <= num_tokens``, where the
    count includes tokens scheduled in plans still in flight (the counter advances when a plan is made);
    ``block_ids`` hold the KV slots of the first ``num_computed_tokens`` tokens; a request waiting for a
    sampled token has ``num_uncomputed == 0`` and is not scheduled again until the token is appended; a
    finished request owns no blocks once no plan holding it is in flight (``num_in_flight == 0``).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    max_tokens: int = 16
    group_id: str = ""
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    num_in_flight: int = 0  # plans holding this request that have not come back yet
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache at the last admission
    num_registered_blocks: int = 0  # leading full blocks recorded in (or taken from) the prefix cache
    stop_reason: int | str | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decode(self) -> bool:
        """True when the only token left to compute is the last generated one (a decode step)."""
        n = self.num_computed_tokens
        return n == len(self.token_ids) - 1 and n >= self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        # Spelled out rather than ``self.status.finished``: this is read several times per token.
        s = self.status
        return s is not _WAITING and s is not _RUNNING
