"""Cutting tool calls out of a choice's text as it streams, as OpenAI's chunk deltas.

One :class:`ToolCallStream` per choice is fed the text as the executor streams it and answers
the deltas to send: ``{"content": ...}`` for text, and for each call first
``{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}``,
then its arguments in pieces as they are generated, ``{"tool_calls": [{"index", "function":
{"arguments": piece}}]}`` (what the openai SDK reassembles). A call's arguments stream as soon as
its name is out: a small scanner follows the JSON value's nesting, so the pieces are exactly the
model's text of the arguments and end where the value ends. A non-streamed answer is the same
feed, all at once (:meth:`ToolCallStream.message`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from choral.server.tool_parsers import REQUIRED_HEADER, ToolCallFormat

Delta = dict[str, Any]


@dataclass
class ToolCall:
    """One call as it is read: complete once its arguments' JSON value ended and parses."""

    index: int
    name: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    arguments: str = ""
    complete: bool = False

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class _ValueScanner:
    """Follows one JSON value char by char: where it ends (its nesting back to zero)."""

    def __init__(self) -> None:
        self.depth = 0
        self.started = False
        self.in_string = False
        self.escaped = False
        self.is_string = False  # the value is a JSON string (arguments encoded as a string)

    def scan(self, text: str) -> tuple[int, int, bool]:
        """(offset where the value starts in ``text`` or -1, offset after what belongs to it, ended)."""
        start = -1
        for i, ch in enumerate(text):
            if not self.started:
                if ch.isspace():
                    continue
                self.started, start = True, i
                self.is_string = ch == '"'
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.is_string:
                        return start, i + 1, True
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return start, i + 1, True
            elif self.depth == 0:  # a bare number or literal is not an arguments object
                return start, i, True
        return start, len(text), False


class ToolCallStream:
    """Splits one choice's text into content and tool calls.

    ``fmt`` is the model's format (tool_choice ``auto``); ``named`` forces one call of that
    function whose arguments are the whole output; ``required`` reads the JSON array of calls
    that tool_choice="required" constrains the output to. ``parallel=False`` keeps the first call.
    """

    def __init__(self, fmt: ToolCallFormat | None = None, named: str | None = None, required: bool = False,
                 parallel: bool = True):
        self.fmt, self.parallel = fmt, parallel
        self.calls: list[ToolCall] = []
        self.content = ""
        self._text = ""  # everything fed, for a tool-call attempt that turns out not to be one
        self._pending = ""  # content held back: it may be the start of the marker
        self._region = ""  # the text after the marker: tool calls
        self._pos = 0  # how far into _region calls were read
        self._scanner: _ValueScanner | None = None
        self._named = named
        if named is not None:
            self._mode = "named"
        elif required:
            self._mode, self._header = "tools", REQUIRED_HEADER
        elif fmt is not None:
            self._mode, self._header = ("undecided" if fmt.starts else "content"), fmt.header()
        else:
            self._mode = "content"

    @property
    def tool_mode(self) -> bool:
        """Whether the output has turned into tool calls (a forced call always has)."""
        return self._mode in ("tools", "named", "done")

    def feed(self, text: str) -> list[Delta]:
        """The deltas for the next piece of text."""
        self._text += text
        if self._mode == "named":
            return self._feed_named(text)
        if self._mode == "done" or not text:
            return []
        if self._mode == "tools":
            self._region += text
            return self._read_calls()
        self._pending += text
        if self._mode == "undecided":
            return self._decide()
        return self._feed_content()

    def finish(self) -> list[Delta]:
        """The deltas for the end of the output: held-back text, a call written in another order."""
        if self._mode == "named":
            call = self.calls[0]
            call.complete = _parses(call.arguments)
            return []
        if self._mode in ("content", "undecided"):
            self._mode = "content"
            out, self._pending = self._pending, ""
            return self._content(out)
        if self._mode == "tools" and not self.calls:
            return self._fallback()
        return []

    def message(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """A whole non-streamed answer: (content, complete calls in OpenAI's shape). An attempt
        at a call that does not parse leaves the text as it was, as content."""
        self.feed(text)
        self.finish()
        calls = [c.as_openai() for c in self.calls if c.complete]
        if not calls:
            return (self._text if self.tool_mode else self.content), []
        return (self.content.strip() or None), calls

    # ---- modes -----------------------------------------------------------------------------------
    def _feed_named(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        if not self.calls:
            assert self._named is not None
            self.calls.append(ToolCall(0, self._named))
            out.append(_header(self.calls[0]))
        if text:
            self.calls[0].arguments += text
            out.append(_arguments(0, text))
        return out

    def _decide(self) -> list[Delta]:
        """A format whose calls are the whole answer (llama3_json): look at its first characters."""
        assert self.fmt is not None
        head = self._pending.lstrip()
        if not head:
            return []
        openers = (self.fmt.marker, *self.fmt.starts)
        if any(head.startswith(o) for o in openers):
            return self._enter_tools(head.removeprefix(self.fmt.marker))
        if any(o.startswith(head) for o in openers):
            return []  # could still be the marker
        self._mode = "content"
        return self._feed_content()

    def _feed_content(self) -> list[Delta]:
        marker = self.fmt.marker if self.fmt is not None else ""
        if not marker:
            out, self._pending = self._pending, ""
            return self._content(out)
        at = self._pending.find(marker)
        if at >= 0:
            before, after = self._pending[:at], self._pending[at + len(marker):]
            return self._content(before) + self._enter_tools(after)
        keep = _partial_suffix(self._pending, marker)
        out, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return self._content(out)

    def _enter_tools(self, text: str) -> list[Delta]:
        self._mode, self._pending, self._region = "tools", "", text
        return self._read_calls()

    def _read_calls(self) -> list[Delta]:
        out: list[Delta] = []
        while self._mode == "tools":
            if self._scanner is None:
                m = self._header.search(self._region, self._pos)
                if m is None:
                    break
                name = next(g for g in m.groups() if g is not None)
                call = ToolCall(len(self.calls), _unescape(name))
                self.calls.append(call)
                out.append(_header(call))
                self._scanner, self._pos = _ValueScanner(), m.end()
            call = self.calls[-1]
            scanner = self._scanner
            segment = self._region[self._pos:]
            start, end, ended = scanner.scan(segment)
            # From where the value starts (leading whitespace is not part of the arguments).
            piece = segment[max(start, 0):end] if scanner.started else ""
            self._pos += end
            if piece and not scanner.is_string:
                call.arguments += piece
                out.append(_arguments(call.index, piece))
            if not ended:
                break
            if scanner.is_string:  # arguments sent as a JSON string holding the JSON: sent whole, decoded
                call.arguments = _decode_string(piece)
                out.append(_arguments(call.index, call.arguments))
            call.complete = _parses(call.arguments)
            self._scanner = None
            if not self.parallel:
                self._mode = "done"
        return out

    def _fallback(self) -> list[Delta]:
        """Calls written with the arguments before the name, or none at all: read the region as
        JSON objects; if none is a call, the region was content after all."""
        decoder, out = json.JSONDecoder(), []
        at = 0
        while at < len(self._region) and (self.parallel or not self.calls):
            brace = self._region.find("{", at)
            if brace < 0:
                break
            try:
                value, at = decoder.raw_decode(self._region, brace)
            except json.JSONDecodeError:
                at = brace + 1
                continue
            args = value.get("arguments", value.get("parameters")) if isinstance(value, dict) else None
            if isinstance(value.get("name") if isinstance(value, dict) else None, str) and isinstance(args, dict):
                call = ToolCall(len(self.calls), value["name"], arguments=json.dumps(args), complete=True)
                self.calls.append(call)
                out += [_header(call), _arguments(call.index, call.arguments)]
        if not self.calls:
            self._mode = "content"
            text = self._text[len(self.content):]
            return self._content(text)
        return out

    def _content(self, text: str) -> list[Delta]:
        if not text:
            return []
        self.content += text
        return [{"content": text}]


def _header(call: ToolCall) -> Delta:
    return {"tool_calls": [{"index": call.index, "id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": ""}}]}


def _arguments(index: int, piece: str) -> Delta:
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (held back: it may complete it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _parses(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _unescape(name: str) -> str:
    try:
        return str(json.loads(f'"{name}"'))
    except json.JSONDecodeError:
        return name


def _decode_string(raw: str) -> str:
    try:
        return str(json.loads(raw))
    except json.JSONDecodeError:
        return re.sub(r'^"|"$', "", raw)
