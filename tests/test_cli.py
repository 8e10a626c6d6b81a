"""``choral generate`` end to end on the bundled model, and --help for every command."""

from __future__ import annotations

import subprocess
import sys

from choral.cli import main


def test_generate_prints_completions_and_speed(capsys) -> None:  # type: ignore[no-untyped-def]
    rc = main(["generate", "What is the capital of France?", "--max-tokens", "12", "--dtype", "float32",
               "--quiet", "--kv-cache-tokens", "4096", "--max-model-len", "1024"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "### What is the capital of France?" in out and "Paris" in out
    assert "tok/s" in out


def test_generate_reports_errors_cleanly(capsys) -> None:  # type: ignore[no-untyped-def]
    rc = main(["generate", "hi", "--model", "/nonexistent/model.gguf", "--quiet"])
    assert rc == 1
    assert "choral: error:" in capsys.readouterr().err


def test_help_explains_the_commands() -> None:
    for args in (["--help"], ["generate", "--help"]):
        result = subprocess.run([sys.executable, "-m", "choral.cli", *args], capture_output=True, text=True)
        assert result.returncode == 0
        assert "generate" in result.stdout


def test_generate_with_decoding_controls(capsys) -> None:  # type: ignore[no-untyped-def]
    rc = main(["generate", "Pick a number.", "--max-tokens", "8", "--dtype", "float32", "--quiet",
               "--kv-cache-tokens", "4096", "--max-model-len", "1024", "--n", "2", "--temperature", "0.8",
               "--seed", "1", "--regex", "[1-9][0-9]?", "--repetition-penalty", "1.1"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith("#0 ") or line.startswith("#1 ")]
    assert len(lines) == 2
    for line in lines:
        text = line[3:].rsplit("  [", 1)[0]
        assert text.isdigit() and 1 <= int(text) <= 99
