"""Logprobs in OpenAI's shapes: each token's raw bytes, its display string and its offset in the text.

A token is a byte string, not always valid UTF-8 on its own (an emoji is often split over two or
three tokens). ``decode([id])`` turns such a piece into U+FFFD, so the bytes are read from the
vocabulary instead: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) spells each byte with one
printable character, SentencePiece vocabularies spell lone bytes as ``<0xNN>``. A token that is
not valid UTF-8 on its own is shown as ``bytes:\\xNN...`` (OpenAI's convention); its ``bytes`` are
exact, so concatenating them rebuilds the text.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from typing import Any

from choral.tokenizer import Tokenizer

Logprob = tuple[float, list[tuple[int, float]]]
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable bytes stand for themselves, the other
    68 are shifted to U+0100 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    decoder = {chr(b): b for b in printable}
    decoder.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return decoder


_BYTE_DECODER = _gpt2_byte_decoder()


def _is_byte_level(hf: Any) -> bool:
    """Whether the tokenizer's decoder is byte-level BPE (alone or in a Sequence)."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return hasattr(hf, "byte_decoder")  # a slow GPT-2 style tokenizer
    try:
        state = json.loads(backend.decoder.__getstate__())
    except Exception:  # a decoder the tokenizers library cannot serialize: assume plain text pieces
        return False
    return bool(state.get("type") == "ByteLevel" or any(d.get("type") == "ByteLevel"
                                                       for d in state.get("decoders", [])))


class TokenBytes:
    """Raw bytes, display strings and text offsets of one tokenizer's tokens (cached per id)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        hf = tokenizer.hf_tokenizer
        self._byte_level = _is_byte_level(hf)
        # Added tokens (<|im_end|>...) are stored as plain text, not in the byte alphabet.
        self._added = set(getattr(hf, "added_tokens_decoder", {}) or {})
        self._special = set(getattr(hf, "all_special_ids", []) or [])
        self._cache: dict[int, bytes] = {}

    def raw(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for."""
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._raw(token_id)
        return cached

    def _raw(self, token_id: int) -> bytes:
        piece = self._tok.token_to_piece(token_id)
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        if token_id in self._added:
            return piece.encode()
        if self._byte_level and all(c in _BYTE_DECODER for c in piece):
            return bytes(_BYTE_DECODER[c] for c in piece)
        return piece.replace("\u2581", " ").encode()  # SentencePiece's word-boundary mark is a space

    def text(self, token_id: int) -> str:
        """The token as a string: its text, or ``bytes:\\xNN...`` when it is not valid UTF-8 alone."""
        raw = self.raw(token_id)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def offsets(self, start: int, skip_special_tokens: bool) -> TextOffsets:
        """Offsets of tokens that follow ``start`` characters of text."""
        return TextOffsets(self, start, self._special if skip_special_tokens else set())

    def completion_logprobs(self, token_ids: Sequence[int], logprobs: Sequence[Logprob | None],
                            offsets: TextOffsets) -> dict[str, Any]:
        """``/v1/completions``' shape; a token without an entry (the first prompt token: nothing
        precedes it) has a null logprob."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, token in enumerate(token_ids):
            entry = logprobs[i] if i < len(logprobs) else None
            out["text_offset"].append(offsets.add(token))
            out["tokens"].append(self.text(token))
            out["token_logprobs"].append(None if entry is None else entry[0])
            out["top_logprobs"].append(None if entry is None else {self.text(t): v for t, v in entry[1]})
        return out

    def chat_logprobs(self, token_ids: Sequence[int], logprobs: Sequence[Logprob]) -> dict[str, Any]:
        """``/v1/chat/completions``' shape."""
        content = []
        for token, (lp, top) in zip(token_ids, logprobs, strict=False):
            content.append({"token": self.text(token), "logprob": lp, "bytes": list(self.raw(token)),
                            "top_logprobs": [{"token": self.text(t), "logprob": v, "bytes": list(self.raw(t))}
                                             for t, v in top]})
        return {"content": content}


class TextOffsets:
    """Character offsets of successive tokens in the text they decode to (OpenAI's ``text_offset``).

    Bytes are decoded as they come: a token that ends inside a character adds nothing until the
    token that completes it, so both point at that character. Special tokens the text leaves out
    add nothing either.
    """

    def __init__(self, tokens: TokenBytes, start: int, skipped: set[int]):
        self._tokens = tokens
        self._skip = skipped
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.chars = start

    def add(self, token_id: int) -> int:
        """The offset of ``token_id``, which follows the tokens added so far."""
        offset = self.chars
        if token_id not in self._skip:
            self.chars += len(self._decoder.decode(self._tokens.raw(token_id)))
        return offset
