"""A stand-in tokenizer for engines built from a model shape alone (paper-scale presets have no
vocabulary files): prompts must be token ids, and generated tokens decode to no text."""

from __future__ import annotations

from typing import Any

from sarathi.errors import InvalidArgument


class TokenIdsOnly:
    """Duck-types ``sarathi.tokenizer.Tokenizer`` for the input and output processors."""

    eos_token_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise InvalidArgument("prompt", "prompt: this engine has no tokenizer; pass prompt_token_ids")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # Empty text keeps the incremental detokenizer and stop-string checks cheap no-ops.
        return ""

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> str:
        raise InvalidArgument("messages", "messages: this engine has no tokenizer or chat template")
