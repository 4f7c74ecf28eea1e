"""Structured outputs (JSON schema, JSON object, regex, choice, EBNF grammar) with xgrammar.

Where each piece lives, and why:

- **Validation** (``grammar.parse``): ``StructuredOutputsParams`` (in ``sampling_params.py``) parses its
  spec into an xgrammar ``Grammar`` when it is constructed, so a bad schema, regex or grammar is an
  ``InvalidArgument`` naming the field before the request goes anywhere. No tokenizer is needed.
- **Compilation** (``StructuredOutputs.compile``): the engine's input processor compiles the grammar
  against the model's vocabulary (``tokenizer_info``), once per (kind, spec, whitespace) thanks to a
  bounded LRU, and makes one ``GrammarState`` (an xgrammar ``GrammarMatcher``) per sequence, so ``n`` /
  ``best_of`` candidates each follow their own tokens. The server runs the input processor in a worker
  thread and xgrammar compiles with the GIL released, so a slow compile never stalls the engine loop or
  the event loop; nothing is compiled inside a step.
- **Matcher state** lives on the scheduler side, next to the request (``Scheduler`` keeps a
  ``GrammarState`` per constrained sequence). A matcher follows exactly the tokens in the request's
  ``token_ids``: it advances once, in ``update_from_output``, when a sampled token is appended. Hence
  - a preempted request, recomputed from its token ids as a longer prompt, keeps its matcher as it is
    (its generated tokens are not generated again, so they are not accepted again);
  - a step retried by failure isolation (``LLMEngine._isolate`` re-runs sub-plans) only re-runs the
    executor: the plan, bitmask included, is the same, and the matcher advances once, from the merged
    output;
  - with several plans in flight (pipeline stages) a request waiting for its token is never scheduled,
    so the matcher is always current when the next mask is filled.
- **Masks travel in the plan**: when a constrained sequence has a token due, ``Scheduler.schedule`` fills
  its next-token bitmask (``GrammarState.next_mask``, ~6 us) into ``SamplingSpec.token_bitmask``
  (bytes: ceil(vocab / 32) int32 words, plain picklable data), so the executor, wherever it runs, needs
  no grammar state. The sampler (``model/sampler.py``) applies the masks of all constrained rows of a
  step in one batched ``xgrammar.apply_token_bitmask_inplace`` call; only rows that sample carry a mask
  (a prompt chunk that samples nothing has no ``SamplingSpec``). Unconstrained requests pay one
  ``is None`` test per sampled row; the scheduler looks no matcher up while no constrained request is
  active. Measured (``python -m sarathi.structured.bench``, 8 requests, 2 CPU cores): fill ~6 us,
  apply ~40 us, accept ~8 us per constrained token, about 1% of a decode step.
- **End of the grammar**: when the matcher accepts its stop token (EOS) it is terminated and the
  scheduler finishes the sequence with ``finish_reason="stop"``; the grammar wins over ``ignore_eos``
  and ``min_tokens`` (a finished grammar allows only EOS).

The pipeline executor applies the masks the same way (its last stage calls the same ``sample``; a
request is never in two plans in flight, so each mask follows the request's previous token). Structured
outputs are enabled for executors that declare ``supports_structured_outputs`` (local and pipeline); the
simulator refuses a structured request with a 400 naming its field.
"""

from sarathi.structured.backend import GrammarState, StructuredOutputs, apply_bitmasks, tokenizer_info
from sarathi.structured.grammar import parse

__all__ = ["GrammarState", "StructuredOutputs", "apply_bitmasks", "parse", "tokenizer_info"]
