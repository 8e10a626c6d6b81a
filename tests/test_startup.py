"""Start-up: ``import choral`` and ``choral --help`` import no heavy module, the GGUF tokenizer's
fast path (the ``tokenizers`` library, no transformers) encodes and decodes exactly as transformers
does, and slow steps print progress lines. Timings live in benchmarks/bench_startup.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from choral import progress
from choral.tokenizer import Tokenizer, _gguf_tokenizer_dir

HEAVY = ("torch", "transformers", "numpy", "gguf", "fastapi", "jinja2", "tokenizers")


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent).stdout.split("\n")[-2]
    return {name.split(".")[0] for name in out.split()}


def test_import_choral_is_light() -> None:
    assert not _imported_after("import choral").intersection(HEAVY)


def test_help_is_light() -> None:
    code = ("import contextlib, io\nfrom choral.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['generate', '--help'])")
    assert not _imported_after(code).intersection(HEAVY)


def test_the_plain_server_does_not_import_ray() -> None:
    """Ray is the optional extra of ``choral serve --replicas``; the single server never loads it."""
    assert "ray" not in _imported_after("import choral.server.app, choral.server.loading, choral.scale.config")
    code = ("import contextlib, io\nfrom choral.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['serve', '--help'])")
    assert "ray" not in _imported_after(code)


def test_lazy_names_resolve() -> None:
    import choral

    aliases = {"GuidedDecodingParams": "StructuredOutputsParams"}  # vLLM's older name, the same class
    for name in choral.__all__:
        assert getattr(choral, name).__name__ == aliases.get(name, name)
    assert set(choral.__all__) <= set(dir(choral))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        choral.Nope  # noqa: B018


TEXTS = [
    "Hello world", "  leading and trailing  ", "naïve café — 日本語 🎉🎉", "<|im_start|>user\nhi<|im_end|>",
    "tabs\tand\nnewlines\r\n", "x" * 300, "", "3.14159 + 2 = 5.14159?", "def f(x):\n    return x ** 2\n",
]


def test_fast_tokenizer_matches_transformers(smollm_path: Path) -> None:
    from transformers import AutoTokenizer

    directory = _gguf_tokenizer_dir(smollm_path, None)
    fast = Tokenizer.from_saved(directory, [])
    assert fast._fast is not None and fast._tok is None  # transformers not loaded for encode/decode
    hf = AutoTokenizer.from_pretrained(str(directory))
    assert fast.vocab_size == len(hf)
    assert fast.bos_token_id == hf.bos_token_id and hf.eos_token_id in fast.eos_token_ids
    for text in TEXTS:
        for special in (True, False):
            ids = fast.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), text
            for skip in (True, False):
                assert fast.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), text
    for token_id in (0, 1, 2, 100, 20000, fast.vocab_size - 1):
        assert fast.token_to_piece(token_id) == hf.convert_ids_to_tokens(token_id)
    messages = [{"role": "user", "content": "hi"}]
    assert fast.has_chat_template
    assert fast.apply_chat_template(messages) == hf.encode(
        hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)


def test_tokenizer_cache_is_keyed_by_metadata(smollm_path: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CHORAL_CACHE_DIR", str(tmp_path))
    first = _gguf_tokenizer_dir(smollm_path, "digest-a")
    assert first.parent == tmp_path / "tokenizers" and (first / "tokenizer.json").exists()
    stamp = (first / "tokenizer.json").stat().st_mtime_ns
    assert _gguf_tokenizer_dir(smollm_path, "digest-a") == first  # reused, not rebuilt
    assert (first / "tokenizer.json").stat().st_mtime_ns == stamp
    assert _gguf_tokenizer_dir(smollm_path, "digest-b") != first  # other metadata: another entry


def test_progress_lines_only_for_slow_steps(capsys) -> None:  # type: ignore[no-untyped-def]
    progress.set_enabled(True)
    try:
        with progress.step("quick"):
            pass
        with progress.step("slow", threshold_s=0.05):
            time.sleep(0.3)
        with pytest.raises(RuntimeError), progress.step("broken", threshold_s=0.05):
            time.sleep(0.3)
            raise RuntimeError("boom")
    finally:
        progress.set_enabled(None)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "choral: slow ..." and lines[1].startswith("choral: slow: done in 0.")
    assert lines[2] == "choral: broken ..." and lines[3].startswith("choral: broken: failed in 0.")
    assert len(lines) == 4


def test_progress_off(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CHORAL_PROGRESS", "0")
    with progress.step("slow", threshold_s=0.01):
        time.sleep(0.1)
    assert capsys.readouterr().err == ""
