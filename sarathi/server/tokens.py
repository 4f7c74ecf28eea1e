"""vLLM's utility routes: ``POST /tokenize`` and ``POST /detokenize`` (same intake rules as the API)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from pydantic import Field

from sarathi.errors import InvalidArgument
from sarathi.server import protocol as P
from sarathi.server.intake import APIError, check_content_type, parse, read_body
from sarathi.server.serving import OpenAIServing, _bad_request


class TokenizeRequest(P.ModelNamed, P.ChatTemplateFields):
    """Either ``prompt`` (text) or ``messages`` (rendered with the chat template first, with the same
    template fields as ``/v1/chat/completions``)."""

    prompt: str | None = None
    messages: list[P.ChatMessage] | None = None
    add_special_tokens: bool = True

    def text(self) -> str:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidArgument("prompt", "prompt: send exactly one of 'prompt' and 'messages'")
        if self.prompt is not None:
            chat_only = sorted(self.model_fields_set & set(P.ChatTemplateFields.model_fields))
            if chat_only:
                raise InvalidArgument(chat_only[0], f"{chat_only[0]}: only applies to 'messages', not to "
                                                    "'prompt'")
            return P.check_unicode(self.prompt, "prompt ")
        return ""


class DetokenizeRequest(P.ModelNamed):
    tokens: list[int] = Field(max_length=1 << 20)


class TokenServing:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving
        self.engine = serving.engine

    async def tokenize(self, raw: Request) -> dict[str, Any]:
        return await asyncio.to_thread(self._tokenize, await self._body(raw))

    async def detokenize(self, raw: Request) -> dict[str, Any]:
        return await asyncio.to_thread(self._detokenize, await self._body(raw))

    async def _body(self, raw: Request) -> bytes:
        check_content_type(raw)
        return await read_body(raw, self.serving.max_body_bytes)

    def _tokenize(self, body: bytes) -> dict[str, Any]:
        req = parse(body, TokenizeRequest)
        self.serving.check_model(req.model)
        try:
            if req.messages is not None and req.prompt is None:
                conv = [m.for_template() for m in req.messages]
                text = self.serving.render_chat(conv, req)
                ids = self.engine.tokenizer.encode(text, False)  # the template holds any BOS already
            else:
                text = req.text()
                self.serving.encoder.check_length(text)
                ids = self.engine.tokenizer.encode(text, req.add_special_tokens)
        except ValueError as e:
            raise _bad_request(e) from None
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}

    def _detokenize(self, body: bytes) -> dict[str, Any]:
        req = parse(body, DetokenizeRequest)
        self.serving.check_model(req.model)
        vocab = self.engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"tokens: token ids must be in [0, {vocab})", "tokens")
        return {"prompt": self.engine.tokenizer.decode(req.tokens, False)}
