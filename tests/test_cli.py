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
    for args, needle in ((["--help"], "generate"), (["generate", "--help"], "Example"),
                         (["serve", "--help"], "OpenAI"), (["bench", "--help"], "concurrency")):
        result = subprocess.run([sys.executable, "-m", "choral.cli", *args], capture_output=True, text=True)
        assert result.returncode == 0
        assert needle in result.stdout and "--model" in result.stdout or args == ["--help"]


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
