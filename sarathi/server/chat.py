"""Rendering a request's ``messages`` with the chat template, as vLLM does (``/v1/chat/completions`` and
``/tokenize`` share it): the server's ``--chat-template`` override, ``chat_template_kwargs``,
``add_generation_prompt`` and ``continue_final_message``."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from sarathi.errors import InvalidArgument
from sarathi.server.protocol import ChatTemplateFields

# Template variables the server sets itself; chat_template_kwargs may not replace them.
RESERVED_KWARGS = frozenset({"messages", "add_generation_prompt", "continue_final_message", "chat_template",
                             "bos_token", "eos_token", "tools", "documents", "tokenize", "raise_exception"})


def continue_final(rendered: str, final: str) -> str:
    """``rendered`` cut right after the text of the final message, so the model continues it; the same
    rule as transformers' ``apply_chat_template(continue_final_message=True)``."""
    stripped = final.strip()
    if stripped not in rendered:
        raise InvalidArgument("messages", "messages: continue_final_message: the text of the final message "
                                          "does not appear in the rendered chat, so it cannot be continued")
    loc = rendered.rindex(stripped)
    if rendered[loc:loc + len(final.lstrip())] == final:  # the template kept the message as it was
        return rendered[:loc + len(final.lstrip())]
    return rendered[:loc + len(stripped)]  # the template trimmed trailing whitespace


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], fields: ChatTemplateFields,
                chat_template: str | None = None) -> str:
    """The prompt text for ``messages``; ``chat_template`` (the server's override) replaces the model's.
    Raises InvalidArgument naming the request field at fault."""
    if fields.chat_template is not None:
        raise InvalidArgument("chat_template", "chat_template: a chat template in the request is not "
                                               "accepted; the server's --chat-template sets it")
    kwargs = dict(fields.chat_template_kwargs or {})
    for key in kwargs:
        if key in RESERVED_KWARGS:
            own = "; send it as the request's own field" if key in type(fields).model_fields else ""
            raise InvalidArgument(f"chat_template_kwargs.{key}", f"chat_template_kwargs.{key}: set by the "
                                                                 f"server, not by chat_template_kwargs{own}")
    add_generation_prompt = fields.add_generation_prompt
    if fields.continue_final_message:
        if add_generation_prompt and "add_generation_prompt" in fields.model_fields_set:
            raise InvalidArgument("continue_final_message", "continue_final_message: cannot be used with "
                                                            "add_generation_prompt: true")
        add_generation_prompt = False
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt, chat_template, **kwargs)
    except (TemplateError, TypeError) as e:  # e.g. a template variable of the wrong type
        param = "chat_template_kwargs" if kwargs else "messages"
        raise InvalidArgument(param, f"{param}: the chat template failed to render: {e}") from None
    if fields.continue_final_message:
        text = continue_final(text, str(messages[-1].get("content", "")))
    return text
