"""Tokenizers (HF `tokenizers` library), chat templates, and incremental detokenization.

HF folders load ``tokenizer.json``; GGUF files (byte-level BPE with any llama.cpp pre-tokenizer we know,
and SentencePiece) are rebuilt from their metadata in well under a second by ``sarathi.gguf_tokenizer``,
without transformers.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jinja2 import TemplateSyntaxError
from tokenizers import Tokenizer as HFTokenizer

from sarathi.chat_template import compile_template
from sarathi.chat_template import render as chat_template_render
from sarathi.errors import InvalidArgument
from sarathi.model.loader import ModelSource


class Tokenizer:
    """Text <-> token ids, plus the model's chat template."""

    def __init__(
        self,
        tk: Any,
        eos_token_id: int | None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tk = tk
        self.eos_token_id = eos_token_id
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        # Named templates besides the default (HF's list form, GGUF's tokenizer.chat_template.NAME); a
        # "tool_use" one renders chats with tools, as transformers picks it.
        self.named_chat_templates: dict[str, str] = {}
        # Special tokens a template may read besides bos_token / eos_token (unk_token, pad_token, ...).
        self.extra_special_tokens: dict[str, str] = {}

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The batch entry points release the GIL while they work (``encode`` holds it: a 1 MB prompt
        # froze every other thread of a server, its event loop included, for ~1 s); same ids.
        batch = getattr(self._tk, "encode_batch_fast", None) or self._tk.encode_batch
        return list(batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The special tokens a chat template sees, as transformers' ``special_tokens_map``: only the
        ones this tokenizer has (a template reading a missing ``bos_token`` gets jinja's undefined)."""
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, **self.extra_special_tokens}
        return {k: v for k, v in named.items() if v is not None}

    def template_for(self, chat_template: str | None = None, tools: list[Any] | None = None) -> str:
        """The template that renders a chat: ``chat_template`` if given, else the "tool_use" named
        template when there are tools and the model has one, else the model's (transformers' rule)."""
        if chat_template:
            return chat_template
        if tools is not None and "tool_use" in self.named_chat_templates:
            return self.named_chat_templates["tool_use"]
        if not self.chat_template:
            raise InvalidArgument("messages",
                                  "messages: this model has no chat template; pass chat_template=...")
        return self.chat_template

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        chat_template: str | None = None, *, tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` to text exactly as transformers' ``apply_chat_template(..., tokenize=False)``
        does (``sarathi.chat_template``): ``tools`` and ``documents`` reach the template as such;
        ``template_kwargs`` are extra template variables (e.g. vLLM's ``chat_template_kwargs`` such as
        ``enable_thinking``). Raises InvalidArgument, or jinja2's TemplateError when the template fails
        (``raise_exception`` included)."""
        template = self.template_for(chat_template, tools)
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise InvalidArgument("messages",
                                  "messages: must be a list of {'role': ..., 'content': ...} objects")
        return chat_template_render(template, messages, tools=tools, documents=documents,
                                    add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message,
                                    special_tokens=self.special_tokens_map, **template_kwargs)

    @classmethod
    def load(cls, src: ModelSource) -> Tokenizer:
        tok = _from_gguf(src) if src.kind == "gguf" else _from_hf_folder(src.path)
        if src.kind == "gguf":  # llama.cpp writes HF's named templates as tokenizer.chat_template.NAME
            prefix = "tokenizer.chat_template."
            tok.named_chat_templates = {k[len(prefix):]: v for k, v in src.gguf_meta.items()
                                        if k.startswith(prefix) and isinstance(v, str)}
        return tok


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: the text of a jinja file, or the argument itself as template text (with its
    backslash escapes such as ``\\n`` decoded), as vLLM does. Raises ``InvalidArgument("chat_template")``
    for a path that cannot be read and for a template that does not parse, so a bad one fails at
    start-up, not on the first chat request."""
    if value is None:
        return None
    field, path = "chat_template", os.path.expanduser(value)
    source: str | None = path  # the file read, None for template text
    try:
        with open(path, encoding="utf-8") as f:
            template = f.read()
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name, or a file not in UTF-8
        if not any(c in value for c in "{}\n"):
            raise InvalidArgument(field, f"{field}: {value!r} looks like a file path, but it cannot be "
                                         f"read ({e}); pass a jinja file or the template text") from None
        source = None
        try:  # non-Latin-1 characters survive as \uXXXX escapes, which unicode_escape decodes back
            template = value.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError as ue:
            msg = f"{field}: bad backslash escape in the template text: {ue}"
            raise InvalidArgument(field, msg) from None
    if not template.strip():
        raise InvalidArgument(field, f"{field}: the template {value!r} is empty")
    try:
        _compile(template)
    except TemplateSyntaxError as e:
        where = f"{source}, line {e.lineno}" if source else f"line {e.lineno}"
        raise InvalidArgument(field, f"{field}: the template does not parse ({where}): {e.message}") from None
    return template


def _compile(template: str) -> Any:
    return compile_template(template)


def _token_str(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _from_hf_folder(path: str) -> Tokenizer:
    tk_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tk_path):
        raise ValueError(f"model: {path} has no tokenizer.json")
    tk = HFTokenizer.from_file(tk_path)
    conf: dict[str, Any] = {}
    conf_path = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(conf_path):
        with open(conf_path) as f:
            conf = json.load(f)
    template = conf.get("chat_template")
    named: dict[str, str] = {}
    if isinstance(template, list):  # named templates: the default one, and the others by name
        named = {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
        template = named.pop("default", None)
    jinja_path = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    extra_dir = os.path.join(path, "additional_chat_templates")  # transformers 4.54+: NAME.jinja files
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra_dir, name)) as f:
                    named.setdefault(name[:-len(".jinja")], f.read())
    eos = _token_str(conf.get("eos_token"))
    tok = Tokenizer(tk, tk.token_to_id(eos) if eos else None, _token_str(conf.get("bos_token")), eos,
                    template)
    tok.named_chat_templates = named
    others = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    tok.extra_special_tokens = {k: v for k in others if isinstance(v := _token_str(conf.get(k)), str)}
    return tok


def _from_gguf(src: ModelSource) -> Tokenizer:
    from sarathi.gguf_tokenizer import tokenizer_from_gguf

    built = tokenizer_from_gguf(src.gguf_reader.fields)  # ValueError("model: ...") if unsupported
    return Tokenizer(built.tokenizer, built.eos_token_id, built.bos_token, built.eos_token,
                     src.gguf_meta.get("tokenizer.chat_template"))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    A few prompt tokens are kept as left context so tokenizers that drop a leading space (SentencePiece)
    decode the first generated token correctly; text is released only once it no longer ends in an
    incomplete UTF-8 sequence (U+FFFD).
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append one token and return the newly readable text (maybe empty)."""
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        full = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(full) > len(before) and not full.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return full[len(before):]
        return ""
