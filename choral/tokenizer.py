"""The model's tokenizer and chat template, behind a small typed interface."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from choral.errors import InvalidRequestError, ModelLoadError

ChatMessage = dict[str, Any]


class Tokenizer:
    """Wraps a transformers tokenizer loaded from the model's own files (never the hub)."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int]):
        self._tok = hf_tokenizer
        ids = set(eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            ids.add(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(ids))

    @classmethod
    def from_model_path(cls, path: Path, eos_token_ids: Sequence[int]) -> Tokenizer | None:
        """Load from a GGUF file or an HF directory; None when the directory has no tokenizer."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        try:
            if path.is_file():
                tok = _gguf_tokenizer(path)
            else:
                names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
                if not any((path / n).exists() for n in names):
                    return None
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many kinds; all mean the same to a user
            raise ModelLoadError(f"{path}: cannot load the tokenizer ({e})") from e
        return cls(tok, eos_token_ids)

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped transformers tokenizer (grammar engines build their vocabulary from it)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def bos_token_id(self) -> int | None:
        value = self._tok.bos_token_id
        return int(value) if value is not None else None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True, field: str = "prompt") -> list[int]:
        """Token ids of ``text``; ``field`` names it in the InvalidRequestError raised for text that is
        not a str or not valid Unicode (a lone surrogate such as ``"\\udc80"`` has no UTF-8 form)."""
        check_text(field, text)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def token_to_piece(self, token_id: int) -> str:
        return str(self._tok.convert_ids_to_tokens(int(token_id)))

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True
    ) -> list[int]:
        """Render ``messages`` with the model's template and tokenize the result."""
        if not self.has_chat_template:
            raise InvalidRequestError("this model has no chat template; pass a text prompt instead")
        if isinstance(messages, str | bytes | dict) or not isinstance(messages, Sequence):
            raise InvalidRequestError(f"messages: must be a list of chat messages, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidRequestError(f"messages[{i}]: a chat message must be a dict with 'role' and 'content', "
                                          f"got {m!r}")
            if not isinstance(m["role"], str) or not m["role"]:
                raise InvalidRequestError(f"messages[{i}].role: must be a non-empty str, got {m['role']!r}")
            content = m["content"]
            if not isinstance(content, str):
                # OpenAI's content parts are joined into one str by the server, not here.
                hint = "; join the text parts into one str" if isinstance(content, list) else ""
                raise InvalidRequestError(
                    f"messages[{i}].content: must be a str, got {type(content).__name__}{hint}")
            check_text(f"messages[{i}].content", content)
        text = self._tok.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=False
        )
        # The template already holds any BOS it wants; do not add special tokens again.
        return self.encode(str(text), add_special_tokens=False, field="messages")


def check_text(field: str, text: object) -> None:
    """Raise InvalidRequestError naming ``field`` unless ``text`` is a str that UTF-8 can encode
    (tokenizers fail on lone surrogates with a bare TypeError or a panic)."""
    if not isinstance(text, str):
        raise InvalidRequestError(f"{field}: must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{field}: not valid Unicode: {text[e.start:e.end]!r} at index {e.start} is a lone surrogate"
        ) from None


def _gguf_tokenizer(path: Path) -> Any:
    """transformers' GGUF tokenizer conversion takes seconds; do it once per file and keep the
    result as HF tokenizer files under ~/.cache/choral/tokenizers (keyed by file identity and the
    transformers version)."""
    import hashlib

    import transformers
    from transformers import AutoTokenizer

    from choral.kernels.build import cache_dir

    stat = path.stat()
    key = hashlib.sha256(
        f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}".encode()
    ).hexdigest()[:16]
    cached = cache_dir().parent / "tokenizers" / key
    if (cached / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception:  # a damaged cache entry: rebuild it below
            pass
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    try:
        import shutil
        import tempfile

        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            tok.save_pretrained(tmp)
            shutil.rmtree(cached, ignore_errors=True)
            os.replace(tmp, cached)
            os.makedirs(tmp, exist_ok=True)  # let TemporaryDirectory clean up an empty dir
    except OSError:
        pass  # no writable cache: convert again next time
    return tok
