"""``choral generate`` end to end on the bundled model, and --help for every command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from choral.cli import main


@pytest.mark.model
def test_generate_prints_completions_and_speed(capsys) -> None:  # type: ignore[no-untyped-def]
    rc = main(["generate", "What is the capital of France?", "--max-tokens", "12", "--dtype", "float32",
               "--weights", "dequantize",
               "--quiet", "--kv-cache-tokens", "4096", "--max-model-len", "1024"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "### What is the capital of France?" in out and "Paris" in out
    assert "tok/s" in out


def test_generate_reports_errors_cleanly(capsys) -> None:  # type: ignore[no-untyped-def]
    rc = main(["generate", "hi", "--model", "/nonexistent/model.gguf", "--quiet"])
    assert rc == 1
    assert "choral: error:" in capsys.readouterr().err


def help_text(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "choral.cli", *args, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def test_help_explains_the_commands() -> None:
    top = help_text()
    for command in ("generate", "serve", "chat", "bench"):  # the top level lists every command
        assert f"    {command} " in top, (command, top)
    for command, needle in (("generate", "Example"), ("chat", "/reset"), ("serve", "OpenAI"),
                            ("bench", "concurrency")):
        text = help_text(command)  # each command explains itself and takes --model
        assert needle in text and "--model" in text, (command, text)


def test_bench_in_process_writes_table_json_and_plot(tiny_models, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    directory, _ = tiny_models["llama"]
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--model", str(directory), "--dtype", "float32", "--concurrency", "1,4", "--num-prompts", "6",
               "--input-len", "8", "--output-len", "5", "--kv-cache-tokens", "1024", "--max-model-len", "64",
               "--block-size", "4", "--json", str(out_json), "--plot", str(out_png), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| concurrency |" in out and "TTFT p50" in out
    data = json.loads(out_json.read_text())
    assert [lvl["concurrency"] for lvl in data["levels"]] == [1, 4]
    assert all(lvl["output_tokens"] == 30 for lvl in data["levels"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_through_a_pseudo_terminal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Loading said, one exchange, /system and /reset, an unknown command refused, line history
    (Up recalls the last line), then /exit, driven through a pty like a person would."""
    import os
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: become `choral chat`
        os.environ["CHORAL_CACHE_DIR"] = str(tmp_path)  # the input history goes there, not to ~/.cache
        os.execv(sys.executable, [sys.executable, "-m", "choral.cli", "chat", "--dtype", "float32",
                                  "--weights", "dequantize", "--temperature", "0", "--max-tokens", "24",
                                  "--kv-cache-tokens", "4096", "--max-model-len", "2048"])
    buffer = b""

    def read_until(needle: bytes, timeout: float = 180) -> bytes:
        nonlocal buffer
        deadline = time.monotonic() + timeout
        while needle not in buffer:
            assert time.monotonic() < deadline, f"timed out waiting for {needle!r}; got {buffer[-500:]!r}"
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    buffer += os.read(fd, 4096)
                except OSError:
                    break
        head, _, rest = buffer.partition(needle)
        buffer = rest
        return head

    try:
        banner = read_until(b"> ")
        assert b"choral chat: loading smollm2-135m-instruct ..." in banner and b"ready in" in banner
        os.write(fd, b"What is the capital of France?\n")
        answer = read_until(b"> ")
        assert b"Paris" in answer
        os.write(fd, b"/system You answer in one word.\n")
        assert b"system prompt" in read_until(b"> ")
        os.write(fd, b"/reset\n")
        assert b"history cleared" in read_until(b"> ")
        os.write(fd, b"/frobnicate now\n")
        refused = read_until(b"> ")
        assert b"unknown command /frobnicate" in refused and b"/reset" in refused and b"/exit" in refused
        os.write(fd, b"\x1b[A\n")  # Up: readline recalls "/frobnicate now"
        assert b"unknown command /frobnicate" in read_until(b"> ")
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert "/frobnicate now" in (tmp_path / "chat_history").read_text()
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)


@pytest.mark.model
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
