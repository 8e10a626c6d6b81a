"""The model's tokenizer and chat template, behind a small typed interface."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from choral.errors import InvalidRequestError, ModelLoadError

ChatMessage = dict[str, Any]

# A chat template is code that comes with the model: it is stopped after this long (a template
# that loops would otherwise hold its thread forever), and its output is refused past this many
# characters before anything tokenizes it. The server passes its own (configurable) limits.
TEMPLATE_TIMEOUT_S = 5.0
MAX_TEMPLATE_CHARS = 4 * 2**20


class Tokenizer:
    """The model's tokenizer, loaded from its own files (never the hub).

    Two ways in: a transformers tokenizer (HF directories), or :meth:`from_saved` on a directory
    holding ``tokenizer.json`` (the converted-GGUF cache), where encode/decode run on the
    ``tokenizers`` library directly and transformers is imported only when a chat template or a
    grammar needs it (importing it costs 1.5-3 s; a plain text prompt never pays that).
    """

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int]):
        self._tok = hf_tokenizer
        self._fast: Any = None  # a tokenizers.Tokenizer when built by from_saved
        self._saved_dir: Path | None = None
        self._config: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._default_template: str | None = None  # the architecture's, for files that carry none
        ids = set(eos_token_ids)
        if hf_tokenizer is not None and hf_tokenizer.eos_token_id is not None:
            ids.add(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(ids))

    @classmethod
    def from_saved(cls, directory: Path, eos_token_ids: Sequence[int]) -> Tokenizer:
        """A tokenizer saved by transformers' ``save_pretrained`` (a ``tokenizer.json`` with its
        ``tokenizer_config.json``), encoding and decoding without importing transformers."""
        from tokenizers import Tokenizer as FastTokenizer

        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        fast = FastTokenizer.from_file(str(directory / "tokenizer.json"))
        if config.get("clean_up_tokenization_spaces") and type(fast.model).__name__ != "BPE":
            # transformers post-processes decoded text for such tokenizers: let it do the decoding.
            return cls(_load_hf(directory), eos_token_ids)
        tok = cls(None, eos_token_ids)
        tok._fast, tok._saved_dir, tok._config = fast, directory, config
        eos = tok._special_id("eos_token")
        tok.eos_token_ids = tuple(sorted(set(tok.eos_token_ids) | ({eos} if eos is not None else set())))
        return tok

    def _special_id(self, name: str) -> int | None:
        value = self._config.get(name)
        if isinstance(value, dict):  # an AddedToken saved as a dict
            value = value.get("content")
        if not isinstance(value, str):
            return None
        token_id = self._fast.token_to_id(value)
        return int(token_id) if token_id is not None else None

    @classmethod
    def from_model_path(cls, path: Path, eos_token_ids: Sequence[int], gguf_digest: str | None = None,
                        stop_tokens: Sequence[str] = (), default_chat_template: str | None = None
                        ) -> Tokenizer | None:
        """Load from a GGUF file or an HF directory; None when the directory has no tokenizer.
        ``gguf_digest`` (the hash of a GGUF file's metadata) keys the converted-tokenizer cache.
        ``stop_tokens``: token texts that end generation besides EOS where the vocabulary has them
        (Gemma's ``<end_of_turn>``); ``default_chat_template``: the architecture's template, used
        when the model's files carry none (GGUF files often do not)."""
        try:
            if path.is_file():
                tok = cls.from_saved(_gguf_tokenizer_dir(path, gguf_digest), eos_token_ids)
            else:
                names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
                if not any((path / n).exists() for n in names):
                    return None
                tok = cls(_load_hf(path), eos_token_ids)
        except ModelLoadError:
            raise
        except Exception as e:  # transformers raises many kinds; all mean the same to a user
            raise ModelLoadError(f"{path}: cannot load the tokenizer ({e})") from e
        stops = [i for i in (tok._token_id(text) for text in stop_tokens) if i is not None]
        tok.eos_token_ids = tuple(sorted(set(tok.eos_token_ids) | set(stops)))
        if not tok.has_chat_template:
            tok._default_template = default_chat_template
        return tok

    def _token_id(self, text: str) -> int | None:
        """The id of the token spelled ``text`` (a whole vocabulary entry), or None."""
        if self._fast is not None:
            token_id = self._fast.token_to_id(text)
            return int(token_id) if token_id is not None else None
        token_id = self._tok.convert_tokens_to_ids(text)
        ok = isinstance(token_id, int) and self._tok.convert_ids_to_tokens(token_id) == text
        return int(token_id) if ok else None

    @property
    def hf_tokenizer(self) -> Any:
        """The transformers tokenizer (chat templates; grammar engines build their vocabulary from
        it). Built on first use when this tokenizer came from :meth:`from_saved`."""
        if self._tok is None:
            with self._lock:
                if self._tok is None:
                    assert self._saved_dir is not None
                    self._tok = _load_hf(self._saved_dir)
        return self._tok

    def warm_up(self) -> None:
        """Build the transformers tokenizer on a background thread (an interactive front end calls
        this while the user types; the first chat template then renders at once)."""
        if self._tok is None:
            threading.Thread(target=lambda: self.hf_tokenizer, name="choral-tokenizer-warm-up", daemon=True).start()

    @property
    def vocab_size(self) -> int:
        if self._fast is not None:
            return int(self._fast.get_vocab_size(with_added_tokens=True))
        return len(self._tok)

    @property
    def bos_token_id(self) -> int | None:
        if self._fast is not None:
            return self._special_id("bos_token")
        value = self._tok.bos_token_id
        return int(value) if value is not None else None

    @property
    def has_chat_template(self) -> bool:
        if self._default_template is not None:
            return True
        if self._saved_dir is not None:
            return bool(self._config.get("chat_template")) or (self._saved_dir / "chat_template.jinja").exists()
        return bool(getattr(self._tok, "chat_template", None))

    @property
    def chat_template(self) -> str | None:
        """The chat template's source (None without one), read without importing transformers."""
        if self._saved_dir is not None:
            template = self._config.get("chat_template")
            path = self._saved_dir / "chat_template.jinja"
            if not template and path.exists():
                template = path.read_text(encoding="utf-8")
        else:
            template = getattr(self._tok, "chat_template", None)
        return template if isinstance(template, str) and template else None

    def encode(self, text: str, add_special_tokens: bool = True, field: str = "prompt") -> list[int]:
        """Token ids of ``text``; ``field`` names it in the InvalidRequestError raised for text that is
        not a str or not valid Unicode (a lone surrogate such as ``"\\udc80"`` has no UTF-8 form)."""
        check_text(field, text)
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._fast is not None:
            return str(self._fast.decode(list(token_ids), skip_special_tokens=skip_special_tokens))
        return str(self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def token_to_piece(self, token_id: int) -> str:
        if self._fast is not None:
            return str(self._fast.id_to_token(int(token_id)))
        return str(self._tok.convert_ids_to_tokens(int(token_id)))

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None, *,
        timeout_s: float = TEMPLATE_TIMEOUT_S, max_chars: int = MAX_TEMPLATE_CHARS,
    ) -> list[int]:
        """Render ``messages`` with the model's template and tokenize the result. A template
        that fails, runs past ``timeout_s`` or renders more than ``max_chars`` characters is an
        InvalidRequestError naming ``messages``.

        ``tools`` go to the template as ``tools`` (OpenAI's tool dicts); ``continue_final_message``
        leaves the last (assistant) message open so the model continues it (prefill);
        ``template_kwargs`` are more variables for the template (``enable_thinking``, say).
        An assistant message may have ``content`` None when it holds ``tool_calls``."""
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
            if content is None and m.get("tool_calls"):
                continue
            if not isinstance(content, str):
                # OpenAI's content parts are joined into one str by the server, not here.
                hint = "; join the text parts into one str" if isinstance(content, list) else ""
                raise InvalidRequestError(
                    f"messages[{i}].content: must be a str, got {type(content).__name__}{hint}")
            check_text(f"messages[{i}].content", content)
        text = self.render_chat_template(messages, add_generation_prompt, tools=tools,
                                         continue_final_message=continue_final_message,
                                         template_kwargs=template_kwargs, timeout_s=timeout_s, max_chars=max_chars)
        # The template already holds any BOS it wants; do not add special tokens again.
        return self.encode(text, add_special_tokens=False, field="messages")

    def render_chat_template(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
                             tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
                             template_kwargs: dict[str, Any] | None = None, *,
                             timeout_s: float = TEMPLATE_TIMEOUT_S, max_chars: int = MAX_TEMPLATE_CHARS) -> str:
        """The template's text for ``messages`` (already checked by the caller), within the limits."""
        from choral.deadline import DeadlineExceeded, call_with_deadline

        # Load (and import) everything before the clock starts: the deadline is for the template's
        # own code, and an import must never be interrupted half way.
        hf = self.hf_tokenizer
        import transformers.utils.chat_template_utils  # noqa: F401

        def render() -> Any:
            return hf.apply_chat_template(list(messages), tools=tools,
                                          add_generation_prompt=add_generation_prompt and not continue_final_message,
                                          continue_final_message=continue_final_message, tokenize=False,
                                          chat_template=self._default_template,  # None: the tokenizer's own
                                          **(template_kwargs or {}))

        try:
            text = call_with_deadline(render, timeout_s)
        except DeadlineExceeded:
            raise InvalidRequestError(f"messages: the model's chat template ran longer than {timeout_s:g} s "
                                      "and was stopped") from None
        except MemoryError:
            raise InvalidRequestError("messages: the model's chat template ran out of memory") from None
        except Exception as e:  # jinja2's TemplateError, raise_exception(), or the template's own bug
            raise InvalidRequestError(f"messages: the chat template failed: {type(e).__name__}: "
                                      f"{str(e)[:300]}") from None
        if not isinstance(text, str):
            raise InvalidRequestError(f"messages: the chat template returned {type(text).__name__}, not text")
        if len(text) > max_chars:
            raise InvalidRequestError(f"messages: the chat template's output has {len(text)} characters, more "
                                      f"than the limit of {max_chars}")
        return text


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


def _load_hf(directory: Path) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def _gguf_tokenizer_dir(path: Path, gguf_digest: str | None) -> Path:
    """transformers' GGUF tokenizer conversion takes seconds; do it once per tokenizer and keep
    the result as HF tokenizer files under the cache root (``CHORAL_CACHE_DIR`` or
    ``~/.cache/choral``) in ``tokenizers/<key>``, keyed by the hash of the GGUF's metadata section
    (which holds the whole vocabulary, merges and chat template) and the transformers version."""
    import shutil
    import tempfile
    from importlib.metadata import version

    from choral.kernels.build import cache_dir
    from choral.progress import step

    if gguf_digest is None:
        from choral.gguf_reader import GGUFReader

        gguf_digest = GGUFReader(path).kv_digest
    key = hashlib.sha256(f"{gguf_digest}:{version('transformers')}".encode()).hexdigest()[:16]
    cached = cache_dir().parent / "tokenizers" / key
    if (cached / "tokenizer_config.json").exists() and (cached / "tokenizer.json").exists():
        return cached
    with step(f"converting the GGUF tokenizer (once; cached in {cached.parent})"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
                tok.save_pretrained(tmp)
                shutil.rmtree(cached, ignore_errors=True)
                os.replace(tmp, cached)
                os.makedirs(tmp, exist_ok=True)  # let TemporaryDirectory clean up an empty dir
        except OSError:
            # No writable cache: keep the conversion in a private temporary directory.
            cached = Path(tempfile.mkdtemp(prefix="choral-tokenizer-"))
            tok.save_pretrained(str(cached))
    return cached
