"""Per-request sampling parameters, with vLLM's names and validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sarathi.errors import InvalidArgument

_GREEDY_EPS = 1e-5
# Range limits, so that a value accepted here can never break the shared sampler mid-batch.
MAX_TEMPERATURE = 100.0  # far past "uniform" already; keeps logits / temperature finite in fp32
MAX_TOP_K = 2**31 - 1  # anything above the vocabulary size means "no top-k"
MAX_LOGPROBS = 20  # vLLM's and OpenAI's limit
MAX_STOP_STRINGS = 64  # each one is searched for after every token
MAX_STOP_TOKEN_IDS = 1024
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_REPETITION_PENALTY = 100.0
MAX_BEST_OF = 64  # as the server's limit on n: each candidate is a full sequence in the KV cache
MAX_STRUCTURED_SPEC_CHARS = 1 << 20  # a schema / regex / grammar longer than this is refused


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a JSON schema, any JSON object, a regex, one of several strings or an
    EBNF grammar (vLLM's ``StructuredOutputsParams``; compiled with xgrammar, see ``sarathi.structured``).

    Exactly one of ``json`` (a JSON schema: a dict, or its JSON text), ``json_object`` (True: any JSON
    object), ``regex``, ``choice`` (a non-empty list of strings) and ``grammar`` (xgrammar's EBNF:
    ``root ::= ...``) is given. ``disable_any_whitespace`` makes JSON compact (no free whitespace
    between tokens: small models otherwise tend to emit runs of newlines). JSON schemas are strict
    (no properties or items beyond those the schema declares), so ``disable_additional_properties`` is
    always in effect, and there is no fallback backend, so ``disable_fallback`` changes nothing; both
    are accepted for vLLM compatibility. ``whitespace_pattern`` and ``structural_tag`` are not supported.

    Invariant: after construction the spec parses (a bad schema, regex or grammar raises
    ``InvalidArgument`` naming ``structured_outputs.<kind>``); ``kind`` and ``spec`` (canonical: a
    schema as compact JSON text, keys in their order) say what to compile. ``field_name`` is the
    request field the engine names in later errors (the server sets it to the field the client used).
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    kind: str = field(default="", init=False)
    spec: Any = field(default=None, init=False, repr=False)
    field_name: str = field(default="structured_outputs", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base = "structured_outputs"
        for name in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgument(f"{base}.{name}", f"{base}.{name}: must be a boolean")
        for name in ("whitespace_pattern", "structural_tag"):
            if getattr(self, name) is not None:
                raise InvalidArgument(f"{base}.{name}", f"{base}.{name}: not supported (xgrammar backend)")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise InvalidArgument(f"{base}.json_object", f"{base}.json_object: must be a boolean")
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            name = f"{base}.{given[1]}" if len(given) > 1 else base
            which = f"got {', '.join(given)}" if given else "got none"
            raise InvalidArgument(name, f"{name}: give exactly one of json, json_object, regex, choice, "
                                        f"grammar ({which})")
        kind = given[0]
        name = f"{base}.{kind}"
        spec: Any = getattr(self, kind)
        if kind == "json":
            from sarathi.structured.grammar import canonical_json

            if not isinstance(spec, str | dict | bool):
                raise InvalidArgument(name, f"{name}: must be a JSON schema (an object or its JSON text)")
            try:
                spec = canonical_json(spec)
            except ValueError as e:
                raise InvalidArgument(name, f"{name}: {e}") from None
        elif kind == "choice":
            if (not isinstance(spec, list | tuple) or not spec
                    or any(not isinstance(c, str) for c in spec)):
                raise InvalidArgument(name, f"{name}: must be a non-empty list of strings")
            spec = list(dict.fromkeys(spec))
        elif kind in ("regex", "grammar"):
            if not isinstance(spec, str) or not spec:
                raise InvalidArgument(name, f"{name}: must be a non-empty string")
        else:
            spec = None
        size = len(spec) if isinstance(spec, str) else sum(len(c) + 1 for c in spec or ())
        if size > MAX_STRUCTURED_SPEC_CHARS:
            raise InvalidArgument(name, f"{name}: longer than {MAX_STRUCTURED_SPEC_CHARS} characters")
        from sarathi.structured.grammar import parse

        try:
            parse(kind, spec, not self.disable_any_whitespace)
        except ValueError as e:
            raise InvalidArgument(name, f"{name}: invalid {_WHAT[kind]}: {e}") from None
        self.kind, self.spec = kind, spec

    @property
    def cache_key(self) -> tuple:
        """What the compiled grammar depends on."""
        spec = tuple(self.spec) if isinstance(self.spec, list) else self.spec
        return (self.kind, spec, self.disable_any_whitespace)


_WHAT = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choice",
         "grammar": "EBNF grammar"}


@dataclass
class SamplingParams:
    """How to sample one request's completion(s).

    Invariant: after construction every field is validated, so the engine never meets a bad value
    mid-batch. ``temperature == 0`` means greedy; ``top_k <= 0`` (or -1) and ``top_p == 1`` disable
    those filters. Penalties follow vLLM / OpenAI: ``presence_penalty`` and ``frequency_penalty`` (in
    [-2, 2]) subtract from the logits of tokens already generated (once, and per occurrence);
    ``repetition_penalty`` (> 0; 1 = off) divides positive and multiplies negative logits of tokens in
    the prompt or the output; ``min_p`` drops tokens less likely than ``min_p`` times the top token;
    ``logit_bias`` maps token ids to values in [-100, 100] added to their logits. All of them apply to
    greedy requests too. ``detokenize=False`` (vLLM's flag) returns token ids only: text stays empty and
    no stop strings are allowed (they are matched on text).

    ``prompt_logprobs`` (0..20, vLLM's field) returns, per prompt token, the logprob of that token given
    the ones before it plus the ``prompt_logprobs`` most likely alternatives (the first prompt token has
    none: ``None``), from the raw model logits (no temperature, penalties or bias).
    ``best_of`` (>= n; vLLM V0 / OpenAI semantics) generates ``best_of`` sequences and returns the ``n``
    with the highest cumulative logprob of their sampled tokens, best first; it needs sampling
    (``temperature > 0``): greedy candidates would all be the same sequence.

    ``structured_outputs`` (a ``StructuredOutputsParams`` or a dict of its fields) constrains every
    sequence to a JSON schema, regex, choice or grammar; the sequence stops (``finish_reason`` "stop")
    when the grammar is complete.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None
    detokenize: bool = True
    prompt_logprobs: int | None = None
    best_of: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    _stop: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> InvalidArgument:
            return InvalidArgument(name, f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"a number in [0, {MAX_TEMPERATURE:g}]")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"-1 (disabled), 0 (disabled) or an integer in [1, {MAX_TOP_K}]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"<= max_tokens ({self.max_tokens})")
        lp = self.logprobs
        if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
            raise bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}]")
        plp = self.prompt_logprobs
        if plp is not None and (not _is_int(plp) or not 0 <= plp <= MAX_LOGPROBS):
            raise bad("prompt_logprobs", f"an integer in [0, {MAX_LOGPROBS}]")
        if self.best_of is not None:
            if not _is_int(self.best_of) or not self.n <= self.best_of <= max(self.n, MAX_BEST_OF):
                raise bad("best_of", f"an integer >= n ({self.n}) and <= {max(self.n, MAX_BEST_OF)}")
            if self.best_of > self.n and self.greedy:
                raise InvalidArgument("best_of", f"best_of: {self.best_of} > n needs sampling "
                                                 "(temperature > 0); greedy candidates would all be the "
                                                 "same sequence")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise bad("seed", "an integer in [-2**63, 2**64 - 1]")
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidArgument("stop", f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        self._stop = list(stop)
        ids = self.stop_token_ids if self.stop_token_ids is not None else []
        if not isinstance(ids, (list, tuple)) or any(not _is_int(t) or t < 0 for t in ids):
            raise bad("stop_token_ids", "a list of non-negative integers")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument("stop_token_ids", f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, "
                                  f"got {len(ids)}")
        self.stop_token_ids = list(dict.fromkeys(ids))
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "a number in [-2, 2]")
        rp = self.repetition_penalty
        if not _is_number(rp) or not 0.0 < rp <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"a number in (0, {MAX_REPETITION_PENALTY:g}]")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "a number in [0, 1]")
        bias = self.logit_bias if self.logit_bias is not None else {}
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS_ENTRIES or any(
                not _is_int(k) or k < 0 or not _is_number(v) or not -100.0 <= v <= 100.0
                for k, v in bias.items()):
            raise bad("logit_bias", f"a map of at most {MAX_LOGIT_BIAS_ENTRIES} non-negative token ids to "
                                    "numbers in [-100, 100]")
        self.logit_bias = {k: float(v) for k, v in bias.items()} or None
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a boolean")
        so = self.structured_outputs
        if isinstance(so, dict):
            try:
                so = self.structured_outputs = StructuredOutputsParams(**so)
            except TypeError as e:
                raise InvalidArgument("structured_outputs", f"structured_outputs: {e}") from None
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise bad("structured_outputs", "a StructuredOutputsParams (or a dict of its fields)")
        if not self.detokenize and self._stop:
            raise InvalidArgument("detokenize", "detokenize: stop strings need text; they cannot be used "
                                                "with detokenize=False")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def penalized(self) -> bool:
        """True if sampling depends on the tokens seen so far (the sampler then needs them)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def num_seqs(self) -> int:
        """How many sequences are generated: ``best_of`` if set, else ``n``."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def keeps_best(self) -> bool:
        """True when more sequences are generated than returned (``best_of > n``): the output keeps
        the ``n`` with the highest cumulative logprob, so every sampled token's logprob is needed."""
        return self.best_of is not None and self.best_of > self.n

    @property
    def stop_strings(self) -> list[str]:
        return self._stop


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    """An int (any size: range checks compare exactly) or a finite float."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))
