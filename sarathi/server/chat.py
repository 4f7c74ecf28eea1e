"""Rendering a request's ``messages`` with the chat template, as vLLM does (``/v1/chat/completions`` and
``/tokenize`` share it): the server's ``--chat-template`` override, ``chat_template_kwargs``,
``add_generation_prompt``, ``continue_final_message``, ``tools`` and ``documents``. The template itself
is rendered exactly as transformers' ``apply_chat_template`` does (``sarathi.chat_template``)."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from sarathi.chat_template import TemplateRaised, template_variables
from sarathi.errors import InvalidArgument
from sarathi.server.protocol import ChatTemplateFields
from sarathi.server.tools import check_tools

# Template variables the server sets itself; chat_template_kwargs may not replace them.
RESERVED_KWARGS = frozenset({"messages", "add_generation_prompt", "continue_final_message", "chat_template",
                             "bos_token", "eos_token", "tools", "documents", "tokenize", "raise_exception"})


def check_template_reads(template: str, variable: str, value: Any) -> None:
    """400 (naming ``variable``) when the request sends ``tools`` / ``documents`` that ``template`` would
    never render: the model would not see them, and the client would not know."""
    if value and variable not in template_variables(template):
        raise InvalidArgument(variable, f"{variable}: the chat template cannot render {variable} (it never "
                                        f"reads the `{variable}` variable); start the server with a "
                                        f"--chat-template that does, or leave out {variable}")


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], fields: ChatTemplateFields,
                chat_template: str | None = None, include_tools: bool = True) -> str:
    """The prompt text for ``messages``; ``chat_template`` (the server's override) replaces the model's.
    ``include_tools=False`` leaves the request's ``tools`` out of the prompt (``tool_choice: "none"`` with
    ``--exclude-tools-when-tool-choice-none``). Raises InvalidArgument naming the request field at
    fault."""
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
    tools = check_tools(fields.tools)
    if not include_tools:
        tools = None
    documents = fields.documents
    try:
        template = tokenizer.template_for(chat_template, tools)
        check_template_reads(template, "tools", tools)
        check_template_reads(template, "documents", documents)
        return tokenizer.apply_chat_template(messages, add_generation_prompt, template, tools=tools,
                                             documents=documents,
                                             continue_final_message=fields.continue_final_message, **kwargs)
    except TemplateRaised as e:  # the template's own raise_exception(...)
        raise InvalidArgument("messages", f"messages: the chat template refused them: {e.message}") from None
    except InvalidArgument:
        raise
    except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError, RecursionError) as e:
        # e.g. a template variable of the wrong type, or messages the template cannot handle
        param = "chat_template_kwargs" if kwargs else "messages"
        raise InvalidArgument(param, f"{param}: the chat template failed to render: {e}") from None
