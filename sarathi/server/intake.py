"""Taking a request body in without letting it stall the server.

Everything here bounds the work one request can make the event loop (or the GIL) do before it is
refused: the body is read in chunks against a byte limit and a JSON-value limit, parsed and validated off
the event loop, and prompts are refused before tokenization when their length alone proves they cannot
fit the context. Tokenization itself goes through the HF tokenizer's batch API, which releases the GIL.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from sarathi.errors import InvalidArgument
from sarathi.server import protocol as P

DEFAULT_MAX_BODY_BYTES = 8 << 20
# json.loads holds the GIL throughout, and each container or number it builds costs 0.1-0.4 us (an
# 8 MiB body of "[1]," took 0.85 s on a loaded 2-core machine). Counting ',', '[' and '{' while the body
# streams in (bytes.count: ~20 us per 64 KiB chunk) bounds that at ~0.1 s while leaving room for 32
# full-context token-id prompts of an 8k-token model. Long strings cost next to nothing to parse.
MAX_JSON_VALUES = 1 << 18


class APIError(Exception):
    """An HTTP error with an OpenAI-style body; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def check_content_type(raw: Request) -> None:
    """Only ``application/json`` (charset, if given, UTF-8). This also refuses the "simple" cross-origin
    requests (text/plain, forms) a web page can make to a key-less server on localhost without a CORS
    preflight."""
    ctype = raw.headers.get("content-type", "")
    media, *params = (part.strip().lower() for part in ctype.split(";"))
    charsets = [p.removeprefix("charset=").strip('"') for p in params if p.startswith("charset=")]
    charset_ok = all(c in ("utf-8", "utf8") for c in charsets)
    if media != "application/json" or not charset_ok:
        raise APIError(415, f"Content-Type must be application/json (UTF-8), not {ctype or 'missing'!r}",
                       "body")


def _too_large(limit: int) -> APIError:
    # Closing the connection spares us reading (and discarding) the rest of an oversized upload.
    return APIError(413, f"body: larger than the server's limit of {limit} bytes", "body",
                    {"Connection": "close"})


async def read_body(raw: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes (from Content-Length
    before reading anything; while reading for chunked uploads) or ``MAX_JSON_VALUES`` JSON values.
    A client that disconnects mid-body raises starlette's ``ClientDisconnect``."""
    length = raw.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    chunks, size, values = [], 0, 0
    async for chunk in raw.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        values += chunk.count(b",") + chunk.count(b"[") + chunk.count(b"{")
        if values > MAX_JSON_VALUES:
            raise APIError(413, f"body: more than {MAX_JSON_VALUES} JSON values", "body",
                           {"Connection": "close"})
        chunks.append(chunk)
    return b"".join(chunks)


def parse(body: bytes, cls: type[BaseModel]) -> Any:
    """Parse and validate a JSON body (run it off the event loop: it is linear in the body's size)."""
    try:
        data = json.loads(body)
    except RecursionError:  # "[[[[..." 10,000 deep
        raise APIError(400, "body: JSON nested too deeply", "body") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise APIError(400, f"body: malformed JSON ({e})", "body") from None
    if not isinstance(data, dict):
        raise APIError(400, "body: must be a JSON object", "body")
    try:
        return cls.model_validate(data)
    except RecursionError:
        raise APIError(400, "body: JSON nested too deeply", "body") from None
    except ValidationError as e:
        param, msg = P.describe_validation_error(e)
        raise APIError(400, msg, param) from None


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> symbol table, which the ByteLevel pre-tokenizer uses."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def length_bound(hf: Any) -> tuple[int, str] | None:
    """``(k, droppable)``: a text of C characters, D of them in ``droppable``, has at least (C - D) / k
    tokens; None where we cannot prove such a bound.

    A byte-level BPE maps every UTF-8 byte to one symbol and silently drops symbols missing from its
    vocabulary (SmolLM2's lacks six ASCII control bytes, so a prompt of 20 MB of "\\x04" is 0 tokens).
    If every UTF-8 continuation byte is in the vocabulary, every character but the single-byte ones in
    ``droppable`` leaves at least one byte in some token, and a token holds at most k bytes (its
    byte-level string's length). Nothing else may remove text: no normalizer, no pre-tokenizer that
    deletes, no truncation, no added token that swallows surrounding whitespace. WordPiece's [UNK] for a
    whole word or fused unknowns would break the bound, hence None for anything but BPE.
    """
    try:
        from tokenizers import pre_tokenizers

        spec = json.loads(hf.to_str())
    except Exception:  # not an HF tokenizers object
        return None
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or spec.get("truncation") is not None or model.get("type") != "BPE":
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if "ByteLevel" not in kinds or any(
            k not in ("ByteLevel", "Digits", "Punctuation", "Split")
            or (k == "Split" and s.get("behavior") == "Removed") for k, s in zip(kinds, steps, strict=True)):
        return None
    vocab, symbols = model.get("vocab") or {}, _byte_symbols()
    if set(symbols.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        return None  # a tokenizers release with another table: prove nothing
    if any(symbols[b] not in vocab for b in range(0x80, 0xC0)):
        return None
    added = spec.get("added_tokens") or []
    if any(a.get("lstrip") or a.get("rstrip") for a in added):
        return None
    droppable = "".join(chr(b) for b in range(0x80) if symbols[b] not in vocab)
    return max([len(t) for t in vocab] + [len(a.get("content", "")) for a in added]), droppable


class PromptEncoder:
    """Tokenizes prompts for the server (call it from a worker thread, not the event loop).

    ``Tokenizer.encode`` releases the GIL while it works, so other threads (the event loop) go on. Texts
    whose length alone proves they exceed the context are refused before any tokenizing.
    """

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        hf = getattr(tokenizer, "_tk", None)
        self.bound = length_bound(hf) if hf is not None else None

    def check_length(self, text: str) -> None:
        """Raise ValueError ("prompt: ...") if ``text`` certainly has max_model_len tokens or more."""
        if self.bound is None or len(text) <= self.bound[0] * self.max_model_len:
            return
        k, droppable = self.bound
        kept = len(text) - sum(text.count(c) for c in droppable)  # str.count: ~5 ms per 20 MB
        if kept > k * self.max_model_len:
            raise InvalidArgument("prompt", f"prompt: {len(text)} characters, more than the model's "
                                            f"context of {self.max_model_len} tokens can hold (no token "
                                            f"stands for more than {k} characters)")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.check_length(text)
        return self.tokenizer.encode(text, add_special_tokens)
