"""Tool-call parsers: model output text -> OpenAI ``tool_calls`` (``--tool-call-parser``, vLLM's names).

A parser turns the text of one choice into ``content`` plus ``tool_calls``, all at once (``parse``) or while
it streams (``stream()``: ``feed`` each new piece of text, then ``finish``). Both run the same state
machine, so the streamed deltas always add up to the complete answer, wherever the text was split.

``hermes`` (Hermes 2 Pro, Qwen2.5 / Qwen3, and other models trained on the same format): each call is a
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block.
- A block whose JSON is an object with a string ``name`` (and ``arguments`` an object, a string holding
  one, or absent for ``{}``) is a tool call: ``id`` ``call_<24 hex>``, ``arguments`` the JSON text of the
  object (``json.dumps``, as vLLM). A block cut by the end of the output (no ``</tool_call>``) counts
  when its JSON is complete, as in vLLM.
- Any other block (malformed JSON, no name, ...) stays in ``content`` as it was written, tags included:
  in vLLM a single malformed block returns the whole output as content; here each block is judged on
  its own, which gives the same answer when it is the only one and is what streaming can honour.
- ``content`` is the text outside the blocks; with tool calls and nothing but whitespace outside them it
  is None. With no tool call at all, ``content`` is the output text unchanged.
- Streaming: text that may start a block (``<``, ``<tool``, ...) and the blocks themselves are held back
  until they are decided, so ``<tool_call>`` never leaks into content deltas; leading whitespace is held
  until something follows it. A call is sent as two deltas, as OpenAI and vLLM stream them: first
  ``{index, id, type, function: {name, arguments: ""}}``, then ``{index, function: {arguments}}``. The
  arguments come whole, when the block closes: a block is known to be a call only once its JSON is
  complete, and a partial call that turned out malformed could not be taken back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = field(default_factory=new_call_id)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedMessage:
    """One choice's message: ``content`` (None when there is none) and its tool calls."""

    content: str | None
    tool_calls: list[ToolCall]


class StreamingToolParser:
    """The parser of one streamed choice: ``feed`` new text, then ``finish`` once; each returns the deltas
    to send, in order: ``{"content": str}`` or ``{"tool_calls": [delta]}``."""

    def __init__(self) -> None:
        self.tool_calls: list[ToolCall] = []

    def _call(self, parser: ToolParser, name: str, arguments: str, out: list[dict[str, Any]]) -> None:
        """Record a complete call (unless ``parser.max_calls`` are already made) and add its two deltas,
        as OpenAI and vLLM stream a call: ``{index, id, type, function: {name, arguments: ""}}``, then
        ``{index, function: {arguments}}``."""
        if parser.max_calls is not None and len(self.tool_calls) >= parser.max_calls:
            return
        tc = ToolCall(name, arguments, parser.new_id())
        index = len(self.tool_calls)
        self.tool_calls.append(tc)
        out.append({"tool_calls": [{"index": index, "id": tc.id, "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})

    def feed(self, text: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def finish(self) -> list[dict[str, Any]]:
        raise NotImplementedError


class ToolParser:
    """A ``--tool-call-parser``: makes one ``StreamingToolParser`` per choice. ``max_calls``: keep at most
    this many calls (``parallel_tool_calls: false`` is 1; later calls are dropped)."""

    name = ""

    def __init__(self, max_calls: int | None = None, new_id: Callable[[], str] = new_call_id) -> None:
        self.max_calls = max_calls
        self.new_id = new_id

    def stream(self) -> StreamingToolParser:
        raise NotImplementedError

    def finish_reason(self, reason: str | None) -> str | None:
        """The finish reason of a choice that made tool calls: "tool_calls" where it stopped on its own
        (EOS or a stop string); "length" and errors keep theirs."""
        return "tool_calls" if reason == "stop" else reason

    def parse(self, text: str) -> ParsedMessage:
        """The message of a complete output ``text``."""
        p = self.stream()
        deltas = p.feed(text) + p.finish()
        content = "".join(d.get("content", "") for d in deltas)
        if p.tool_calls and not content:
            return ParsedMessage(None, p.tool_calls)
        return ParsedMessage(content, p.tool_calls)


class _HermesStream(StreamingToolParser):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, parser: HermesToolParser) -> None:
        super().__init__()
        self.parser = parser
        self.buf = ""  # undecided text: a possible start tag outside a block, or the block so far
        self.inside = False
        self.scanned = 0  # how much of a block's text is known to hold no end tag
        self.ws = ""  # leading whitespace of the content, held until something else follows
        self.content_started = False
        self.finished = False

    # ---- output ----------------------------------------------------------------------------------
    def _content(self, text: str, out: list[dict[str, Any]]) -> None:
        if not text:
            return
        if not self.content_started:
            self.ws += text
            if not self.ws.strip():
                return
            text, self.ws, self.content_started = self.ws, "", True
        if out and "content" in out[-1]:
            out[-1]["content"] += text
        else:
            out.append({"content": text})

    def _block(self, body: str, closed: bool, out: list[dict[str, Any]]) -> None:
        call = self.parser.decode(body)
        if call is None:  # not a call: the text as the model wrote it
            self._content(self.START + body + (self.END if closed else ""), out)
            return
        self._call(self.parser, *call, out)

    # ---- input -------------------------------------------------------------------------------------
    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.finished:
            raise RuntimeError("feed() after finish()")
        out: list[dict[str, Any]] = []
        self.buf += text
        while True:
            if self.inside:
                end = self.buf.find(self.END, self.scanned)
                if end < 0:  # next time, search only where the end tag could now begin
                    self.scanned = max(0, len(self.buf) - len(self.END) + 1)
                    break
                self._block(self.buf[:end], True, out)
                self.buf, self.inside, self.scanned = self.buf[end + len(self.END):], False, 0
                continue
            start = self.buf.find(self.START)
            if start >= 0:
                self._content(self.buf[:start], out)
                self.buf, self.inside = self.buf[start + len(self.START):], True
                continue
            keep = _partial_suffix(self.buf, self.START)
            self._content(self.buf[:len(self.buf) - keep], out)
            self.buf = self.buf[len(self.buf) - keep:]
            break
        return out

    def finish(self) -> list[dict[str, Any]]:
        out = self.feed("")
        self.finished = True
        if self.inside:
            self._block(self.buf, False, out)
        else:
            self._content(self.buf, out)
        self.buf = ""
        if self.ws and not self.tool_calls:  # a whitespace-only answer is still the answer
            out.append({"content": self.ws})
        self.ws = ""
        return out


class HermesToolParser(ToolParser):
    name = "hermes"

    def stream(self) -> StreamingToolParser:
        return _HermesStream(self)

    @staticmethod
    def decode(body: str) -> tuple[str, str] | None:
        """(name, arguments JSON) of a block's text, or None if it is not a well-formed call."""
        try:  # RecursionError: JSON nested deeper than Python's json module goes
            obj = json.loads(body)
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
                return None
            args = obj.get("arguments", {})
            if isinstance(args, str):  # the arguments sent as a JSON string holding the object
                return (obj["name"], args) if isinstance(json.loads(args), dict) else None
            if not isinstance(args, dict):
                return None
            return obj["name"], json.dumps(args, ensure_ascii=False)
        except (ValueError, RecursionError):
            return None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


TOOL_PARSERS: dict[str, type[ToolParser]] = {HermesToolParser.name: HermesToolParser}
