"""What crosses the scheduler/executor boundary: plain, picklable data keyed by request id.

A ``StepPlan`` says, per scheduled sequence, which token ids to compute at which positions, where their
K/V go (the block table), and how to sample the next token if one is due. The executor answers with a
``ModelOutput``. Neither side sees the other's objects, so a plan can be sent to another process (a
pipeline stage) or to a cost model (the simulator) as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class SamplingSpec:
    """Everything the sampler needs for one row.

    ``position`` is the index of the output token being sampled (seeded noise depends only on
    (seed, position), so a retried step draws the same noise); ``banned`` are token ids that may not be
    sampled yet (EOS and stop ids while ``min_tokens`` is not reached). ``output_token_ids`` (and, for
    ``repetition_penalty``, ``prompt_token_ids``) are filled only when a penalty needs them.
    ``token_bitmask`` (structured outputs) is the grammar's mask of allowed tokens, ceil(vocab / 32)
    little-endian int32 words (bit t % 32 of word t // 32 set: token t allowed), filled by the scheduler
    from the request's matcher; None when nothing is constrained.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    position: int = 0
    logprobs: int | None = None
    banned: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()
    token_bitmask: bytes | None = field(default=None, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass(frozen=True)
class PromptLogprobSpec:
    """Prompt logprobs wanted from one chunk: the logits rows at positions ``first ..
    first + len(targets) - 1``, where the row at position p scores prompt token p + 1, ``targets[i]``
    being the token at position ``first + i + 1`` (it may lie past the chunk: the next chunk's first
    token). ``k`` alternatives are returned besides the target.

    Invariant: the rows lie inside the chunk and before the prompt's last token (whose row samples
    the first output token, not a prompt token).
    """

    first: int
    targets: tuple[int, ...]
    k: int = 0


@dataclass
class SeqPlan:
    """One sequence's share of a step: compute ``token_ids`` at positions ``start ..``.

    Invariant: ``block_table`` covers positions ``[0, start + len(token_ids))``; ``sample`` is set exactly
    when the last of these tokens is the sequence's last known token (a token is due);
    ``prompt_logprobs`` is set only for a request that asked for them and only for prompt rows whose
    logprobs were not produced by an earlier chunk (a recomputed prompt asks for none again).
    """

    req_id: str
    token_ids: list[int]
    start: int
    block_table: list[int]
    sample: SamplingSpec | None = None
    is_decode: bool = False
    prompt_logprobs: PromptLogprobSpec | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StepPlan:
    """One engine step: the sequences to run, in execution order (decodes first).

    Immutable once the scheduler returns it (the token counts are computed once, on first use).
    """

    step_id: int
    seqs: list[SeqPlan] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    num_recomputed_tokens: int = 0  # computed tokens whose KV this step's preemptions threw away

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @cached_property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @cached_property
    def num_decode_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs if s.is_decode)

    @property
    def num_prompt_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens

    def subset(self, seqs: list[SeqPlan]) -> StepPlan:
        """The same step restricted to ``seqs`` (used to re-run a failed step without a culprit)."""
        return StepPlan(self.step_id, list(seqs))


@dataclass
class SampledToken:
    token_id: int
    # (sampled token's logprob, its rank, top-n ids, top-n logprobs) when logprobs were asked for.
    logprobs: tuple[float, int, list[int], list[float]] | None = None


@dataclass
class PromptLogprobRows:
    """The answer to a ``PromptLogprobSpec``, one entry per row (column-wise, cheap to pickle):
    ``logprobs[i]`` and ``ranks[i]`` of the target token of the row at position ``first + i``, and
    its ``top_ids[i]`` / ``top_logprobs[i]`` (the k best, best first)."""

    first: int
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class ModelOutput:
    """The executor's answer to a plan: a token per sequence that had ``sample`` set, and the prompt
    logprobs of every sequence that had ``prompt_logprobs`` set.

    ``failed`` maps a request id to why it failed (the engine fills it when it isolates a failure).
    """

    step_id: int
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    execute_time: float = 0.0
    prompt_logprobs: dict[str, PromptLogprobRows] = field(default_factory=dict)

    def merge(self, other: ModelOutput) -> None:
        """Add the per-request results of ``other`` (a sub-plan of the same step) to this output."""
        self.sampled.update(other.sampled)
        self.failed.update(other.failed)
        self.prompt_logprobs.update(other.prompt_logprobs)
