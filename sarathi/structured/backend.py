"""xgrammar glue: the vocabulary (``tokenizer_info``), the compiler with its LRU cache
(``StructuredOutputs``), the per-sequence matcher (``GrammarState``) and the batched mask
(``apply_bitmasks``). xgrammar (and the transformers it imports) is loaded on first use only, so
engines that never see a structured request do not pay its ~2 s import.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from sarathi.structured.grammar import describe, parse

if TYPE_CHECKING:
    import torch

    from sarathi.sampling_params import StructuredOutputsParams

CACHE_ENTRIES = 128  # compiled grammars kept (LRU)
CACHE_BYTES = 512 * 2**20  # ... and at most this much of their memory (xgrammar's own estimate)


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: list[int] | tuple[int, ...]) -> Any:
    """xgrammar's ``TokenizerInfo`` for ``tokenizer`` (a ``sarathi.tokenizer.Tokenizer`` around an HF
    ``tokenizers.Tokenizer``, from a folder or rebuilt from a GGUF file) and a model whose LM head has
    ``vocab_size`` rows.

    The vocabulary type (byte-level BPE, byte fallback, raw) and the prefix space are detected as
    ``TokenizerInfo.from_huggingface`` does; ids past the tokenizer's vocabulary (a padded LM head) are
    empty tokens, which xgrammar never allows, and so are special added tokens (``<|im_start|>``...):
    their text would vanish from the output (``skip_special_tokens``) and break the structure. The stop
    tokens (which end a grammar) are the engine's EOS ids.
    """
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    tk = getattr(tokenizer, "_tk", None)
    if tk is None or not callable(getattr(tk, "get_vocab", None)):
        raise ValueError("needs the model's tokenizer (this engine has token ids only)")
    stops = [t for t in stop_token_ids if 0 <= t < vocab_size] or None
    detected = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tk),
                                                  vocab_size=vocab_size, stop_token_ids=stops)
    encoded = [""] * vocab_size
    for text, i in tk.get_vocab(with_added_tokens=True).items():
        if 0 <= i < vocab_size:
            encoded[i] = text
    for i, added in tk.get_added_tokens_decoder().items():
        if added.special and 0 <= i < vocab_size:
            encoded[i] = ""
    return xgr.TokenizerInfo(encoded, detected.vocab_type, vocab_size=vocab_size,
                             stop_token_ids=list(detected.stop_token_ids),
                             add_prefix_space=detected.add_prefix_space)


class GrammarState:
    """One sequence's matcher. Used by the scheduler only (the engine's thread): ``next_mask`` before a
    token is sampled, ``accept`` once the token is appended to the request."""

    __slots__ = ("matcher", "_buf")

    def __init__(self, matcher: Any, buf: torch.Tensor) -> None:
        self.matcher = matcher
        self._buf = buf  # [1, ceil(vocab / 32)] int32, shared by the states of one engine

    def next_mask(self) -> bytes | None:
        """The bitmask of the tokens allowed next (bit t of word t // 32 set: allowed), or None when
        every token is allowed."""
        if not self.matcher.fill_next_token_bitmask(self._buf, 0):
            return None
        return self._buf.numpy().tobytes()

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False if the grammar does not allow it."""
        return bool(self.matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: the sequence is done."""
        return bool(self.matcher.is_terminated())


class StructuredOutputs:
    """Compiles specs against one model's vocabulary and hands out matchers. Thread-safe: the server
    prepares requests in worker threads (xgrammar compiles with the GIL released)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...],
                 cache_entries: int = CACHE_ENTRIES, cache_bytes: int = CACHE_BYTES) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._cached_bytes = 0
        self._compiler: Any = None
        self._buf: Any = None
        self.hits = self.misses = 0

    def _ensure(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids)
                self._buf = xgr.allocate_token_bitmask(1, info.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                                     cache_enabled=False)
            return self._compiler

    def compile(self, so: StructuredOutputsParams) -> Any:
        """The ``CompiledGrammar`` of ``so`` (from the cache when the same spec was compiled before)."""
        compiler = self._ensure()
        key = so.cache_key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        try:  # outside the lock: two threads may compile the same spec at once, which is harmless
            compiled = compiler.compile_grammar(parse(so.kind, so.spec, not so.disable_any_whitespace))
        except RuntimeError as e:
            raise ValueError(describe(e)) from None
        size = int(compiled.memory_size_bytes)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = compiled
                self._cached_bytes += size
            while self._cache and (len(self._cache) > self.cache_entries
                                   or self._cached_bytes > self.cache_bytes):
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= int(old.memory_size_bytes)
        return compiled

    def new_state(self, compiled: Any) -> GrammarState:
        import xgrammar as xgr

        return GrammarState(xgr.GrammarMatcher(compiled), self._buf)

    @property
    def num_cached(self) -> int:
        return len(self._cache)


def apply_bitmasks(logits: torch.Tensor, rows: list[int], masks: list[bytes]) -> None:
    """Set to -inf, in place, the logits of the tokens that ``masks[j]`` forbids in row ``rows[j]``
    (one batched call for all constrained rows). Raises ValueError if a mask allows no token at all
    (failure isolation then pins it to that request)."""
    import torch
    import xgrammar as xgr

    n, vocab = logits.shape
    if any(m.count(0) == len(m) for m in masks):  # (bytes.count runs in C: ~1 us per 6 KB mask)
        raise ValueError("structured output: the grammar allows no token here")
    words = len(masks[0]) // 4
    full = torch.full((n, words), -1, dtype=torch.int32)  # rows not in ``rows`` are left alone anyway
    full[rows] = torch.frombuffer(bytearray(b"".join(masks)), dtype=torch.int32).view(len(rows), words)
    covered = min(vocab, words * 32)
    # CPU: xgrammar's C++ kernel. Elsewhere its plain-torch version: a few kernel launches, no Triton
    # JIT compile inside a step and nothing that can fail to build (the masks are not the bottleneck).
    backend = "cpu" if logits.device.type == "cpu" else "torch_native"
    xgr.apply_token_bitmask_inplace(logits, full.to(logits.device, non_blocking=True), vocab_size=covered,
                                    indices=rows, backend=backend)
    if covered < vocab:  # an LM head wider than the grammar's vocabulary: those ids are never allowed
        logits[torch.tensor(rows, device=logits.device), covered:] = float("-inf")
