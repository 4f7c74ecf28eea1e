"""Input processing: validate a prompt and its sampling parameters, tokenize, make the sequences."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from sarathi.engine.group import PromptType, RequestGroup
from sarathi.errors import InvalidArgument
from sarathi.outputs import RequestMetrics
from sarathi.request import Request
from sarathi.sampling_params import SEED_MAX, SamplingParams
from sarathi.tokenizer import Tokenizer


class InputProcessor:
    """Turns (request id, prompt, params) into a ``RequestGroup``, or raises ``InvalidArgument``.

    Everything that could break a shared step later (token ids outside the vocabulary, a request that
    can never fit the context or the KV cache) is refused here, before the request joins a batch.
    Structured outputs are compiled here (``structured``, a ``sarathi.structured.StructuredOutputs``;
    None: refused), never inside a step; the server calls this from a worker thread.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int,
                 kv_slots: Callable[[], int], clock: Callable[[], float] = time.time,
                 prompt_logprobs: bool = True, structured: Any = None,
                 structured_refusal: str = "not supported by this engine") -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv_slots = kv_slots  # the KV cache can be resized (reconfigure): ask each time
        self.clock = clock
        # False when the executor cannot return prompt logprobs (a pipeline, the simulator): refused here.
        self.prompt_logprobs = prompt_logprobs
        self.structured = structured
        self.structured_refusal = structured_refusal

    def make_group(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                   arrival_time: float | None = None) -> RequestGroup:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidArgument("sampling_params", "sampling_params must be a SamplingParams")
        text, ids = self.tokenize(prompt)
        if not ids:
            raise InvalidArgument("prompt", "prompt: must not be empty")
        vocab = self.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InvalidArgument("prompt", f"prompt: token ids must be integers in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidArgument("stop_token_ids", f"stop_token_ids: token ids must be in [0, {vocab})")
        if params.logit_bias and any(t >= vocab for t in params.logit_bias):
            raise InvalidArgument("logit_bias", f"logit_bias: token ids must be in [0, {vocab})")
        if params.prompt_logprobs is not None and not self.prompt_logprobs:
            raise InvalidArgument("prompt_logprobs", "prompt_logprobs: not supported by this executor "
                                                     "(only the local executor, pipeline_parallel_size 1)")
        if len(ids) >= self.max_model_len:
            raise InvalidArgument("prompt", f"prompt: {len(ids)} tokens, but the model's context "
                                            f"(max_model_len) is {self.max_model_len} and at least one "
                                            f"token must be generated")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise InvalidArgument("max_tokens", f"max_tokens: {max_tokens} + {len(ids)} prompt tokens "
                                                f"exceed the model's context of {self.max_model_len} tokens")
        kv_slots = self.kv_slots()
        if len(ids) + max_tokens > kv_slots:
            raise InvalidArgument("max_tokens", f"max_tokens: prompt + max_tokens = {len(ids) + max_tokens} "
                                                f"tokens do not fit in the KV cache ({kv_slots} tokens)")
        compiled = self._compile(params) if params.structured_outputs is not None else None
        now = self.clock() if arrival_time is None else arrival_time
        seqs = []
        num_seqs = params.num_seqs  # best_of candidates, of which the output keeps the n best
        for i in range(num_seqs):
            p = params
            changes: dict = {}
            if num_seqs > 1 and params.seed is not None:  # distinct but reproducible samples
                seed = params.seed + i
                changes["seed"] = seed - (2**64 if seed > SEED_MAX else 0)  # stays a valid 64-bit seed
            if i > 0 and params.prompt_logprobs is not None:  # the prompt is shared: sequence 0 scores it
                changes["prompt_logprobs"] = None
            if changes:
                p = SamplingParams(**{**_fields(params), **changes})
            seq_id = request_id if num_seqs == 1 else f"{request_id}#{i}"
            seqs.append(Request(seq_id, ids, p, arrival_time=now, max_tokens=max_tokens, group_id=request_id))
        group = RequestGroup(request_id, text, ids, seqs, RequestMetrics(arrival_time=now))
        if compiled is not None:
            group.constraints = [self.structured.new_state(compiled) for _ in seqs]
        return group

    def _compile(self, params: SamplingParams) -> Any:
        """The compiled grammar of ``params.structured_outputs`` (raises InvalidArgument naming the
        request field it came from)."""
        so = params.structured_outputs
        assert so is not None
        name = so.field_name
        if self.structured is None:
            raise InvalidArgument(name, f"{name}: structured outputs are {self.structured_refusal}")
        try:
            return self.structured.compile(so)
        except ValueError as e:
            raise InvalidArgument(name, f"{name}: cannot be compiled for this model: {e}") from None

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if isinstance(prompt.get("prompt"), str):
                return self.tokenize(prompt["prompt"])
            raise InvalidArgument("prompt", "prompt: a dict prompt needs 'prompt' (str) or "
                                            "'prompt_token_ids'")
        if isinstance(prompt, list):
            return None, list(prompt)
        raise InvalidArgument("prompt", f"prompt: must be a string, a list of token ids or a dict, "
                                        f"got {type(prompt)}")


def _fields(p: SamplingParams) -> dict:
    return {f.name: getattr(p, f.name) for f in fields(p) if f.init}
