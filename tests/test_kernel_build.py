"""Building the C kernels survives what a machine throws at it: no compiler, a compiler that fails
or hangs, a cache path that is a file or cannot be written, a truncated cached library, and two
processes building at once. Each case ends in a loadable library or the torch fallback with one
log line. A one-line C file stands in for the kernels (it compiles in milliseconds), and fake
compilers are shell scripts handed over through ``CC``."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from choral.errors import ConfigError
from choral.kernels import build as kbuild

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="needs a C compiler")

SOURCE = "int choral_test_add(int a, int b) { return a + b; }\n"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A source dir with two tiny kernels, an empty cache, a private temp dir; returns tmp_path."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("one", "two"):
        (src / f"{name}.c").write_text(SOURCE)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the fallback lives under here
    monkeypatch.setenv("CHORAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    return tmp_path


def fake_compiler(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-cc"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def counting_compiler(tmp_path: Path, delay: float = 0.0) -> str:
    """A compiler that logs each run to ``runs`` (and sleeps ``delay`` s), then runs the real one."""
    real = shutil.which("gcc") or shutil.which("cc")
    return fake_compiler(tmp_path, f'echo run >> "{tmp_path}/runs"\nsleep {delay}\nexec "{real}" "$@"')


def runs(tmp_path: Path) -> int:
    log = tmp_path / "runs"
    return len(log.read_text().splitlines()) if log.exists() else 0


def build(tmp_path: Path, timeout: float = 60.0) -> dict[str, ctypes.CDLL | None]:
    return kbuild.build(tmp_path / "src", ["one", "two"], timeout)


def add(lib: ctypes.CDLL | None) -> int:
    assert lib is not None
    return int(lib.choral_test_add(2, 3))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_builds_once_then_loads_from_the_cache(env: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORAL_PROGRESS", "1")
    monkeypatch.setenv("CC", counting_compiler(env))
    libs = build(env)
    assert add(libs["one"]) == 5 and add(libs["two"]) == 5
    assert runs(env) == 2  # one compiler process per kernel, both in the one build
    assert sorted(p.suffix for p in (env / "cache" / "kernels").glob("*.so")) == [".so", ".so"]
    capsys.readouterr()
    # Second process start: everything cached, no compiler run, nothing printed.
    libs = build(env)
    assert add(libs["one"]) == 5 and runs(env) == 2
    assert capsys.readouterr().err == ""


def test_compiling_shows_one_progress_line(env: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A build past the progress threshold (1 s; the real kernels take 20 s or more) says so
    while it runs, and once more when it is done."""
    monkeypatch.setenv("CHORAL_PROGRESS", "1")
    monkeypatch.setenv("CC", counting_compiler(env, delay=3.0))
    assert add(build(env)["one"]) == 5
    during, after = capsys.readouterr().err.splitlines()
    assert during == f"choral: {kbuild.COMPILING} ..."
    assert after.startswith(f"choral: {kbuild.COMPILING}: done in ")


def test_no_compiler_is_one_log_line_and_the_fallback(env: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CHORAL_PROGRESS", "1")
    monkeypatch.setenv("CC", str(env / "no-such-compiler"))
    with caplog.at_level(logging.INFO):
        libs = build(env)
    assert libs == {"one": None, "two": None}
    assert len(warnings_of(caplog)) == 1 and "no C compiler (CC=" in warnings_of(caplog)[0]
    assert capsys.readouterr().err == ""


def test_no_compiler_still_loads_what_is_cached(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build(env)
    monkeypatch.setenv("CC", str(env / "no-such-compiler"))
    assert add(build(env)["two"]) == 5


def test_a_failing_compiler_is_one_log_line(env: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", fake_compiler(env, 'echo "fake.c:1: error: the compiler is broken" >&2; exit 1'))
    libs = build(env)
    assert libs == {"one": None, "two": None}
    (message,) = warnings_of(caplog)
    assert "one.c: fake.c:1: error: the compiler is broken" in message and "two.c:" in message


def test_a_hanging_compiler_times_out_and_is_killed(env: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", fake_compiler(env, f'echo $$ >> "{env}/pids"\nsleep 60'))
    t0 = time.monotonic()
    libs = build(env, timeout=1.0)
    assert time.monotonic() - t0 < 15
    assert libs == {"one": None, "two": None}
    (message,) = warnings_of(caplog)
    assert "timed out after 1 s" in message
    for pid in (env / "pids").read_text().split():  # the compilers are gone, not left running
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


def test_cache_path_that_is_a_file_falls_back_to_a_private_temp_dir(env: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    blocker = env / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CHORAL_CACHE_DIR", str(blocker))
    libs = build(env)
    assert add(libs["one"]) == 5
    fallback = env / "tmp" / f"choral-{os.getuid()}" / "kernels"
    assert len(list(fallback.glob("one-*.so"))) == 1
    assert stat.S_IMODE(fallback.parent.stat().st_mode) == 0o700
    (message,) = warnings_of(caplog)
    assert str(blocker) in message and str(fallback) in message
    assert blocker.read_text() == "not a directory"


def test_unwritable_cache_dir_falls_back(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read_only = env / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root writes anywhere; /proc takes no new entries even from root
        read_only = Path("/proc")
    monkeypatch.setenv("CHORAL_CACHE_DIR", str(read_only))
    assert add(build(env)["two"]) == 5
    assert list((env / "tmp" / f"choral-{os.getuid()}" / "kernels").glob("two-*.so"))


def test_a_read_only_cache_holding_the_libraries_is_used_as_is(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build(env)  # e.g. built into an image at install time, mounted read-only later
    monkeypatch.setattr(kbuild, "_can_write", lambda path: False)
    monkeypatch.setenv("CC", fake_compiler(env, "exit 1"))
    assert add(build(env)["one"]) == 5


def test_a_fallback_dir_someone_else_can_write_is_not_used(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORAL_CACHE_DIR", str(Path("/proc")))
    shared = env / "tmp" / f"choral-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a library there
    assert add(build(env)["one"]) == 5
    assert not list(shared.rglob("*.so"))


def _build_in_child(tmp: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    libs = kbuild.build(Path(tmp) / "src", ["one", "two"], 60.0)
    queue.put([add(lib) if lib is not None else None for lib in libs.values()])


def build_in_another_process(tmp_path: Path) -> list[int | None]:
    """What a build in a forked process returned (this process maps none of the libraries: a
    process that did could not see a damaged file replaced, dlopen matches loaded names first)."""
    ctx = multiprocessing.get_context("fork")  # the child inherits this process's imports and env
    queue = ctx.Queue()
    child = ctx.Process(target=_build_in_child, args=(str(tmp_path), queue))
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    return result  # type: ignore[no-any-return]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_cached_library_is_rebuilt(env: Path, damage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_in_another_process(env) == [5, 5]
    (cached,) = (env / "cache" / "kernels").glob("one-*.so")
    data = cached.read_bytes()
    cached.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x7fELF" + b"\0" * 100,
                        "empty": b""}[damage])
    monkeypatch.setenv("CC", counting_compiler(env))
    libs = build(env)
    assert add(libs["one"]) == 5 and add(libs["two"]) == 5
    assert runs(env) == 1  # only the damaged one was compiled again
    assert kbuild._complete_elf(cached)


def test_two_processes_building_at_once_compile_once_and_both_load(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", counting_compiler(env, delay=1.0))  # slow: the second starts mid-build
    ctx = multiprocessing.get_context("fork")  # the children inherit this process's imports and env
    queue = ctx.Queue()
    children = [ctx.Process(target=_build_in_child, args=(str(env), queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert results == [[5, 5], [5, 5]]
    assert runs(env) == 2  # one build of the two kernels: the other process waited on the lock
    assert not list((env / "cache" / "kernels").glob(".build-*"))  # no temp files left behind


def test_bad_timeout_setting_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORAL_KERNEL_BUILD_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="CHORAL_KERNEL_BUILD_TIMEOUT"):
        kbuild.build_timeout()
    monkeypatch.setenv("CHORAL_KERNEL_BUILD_TIMEOUT", "2.5")
    assert kbuild.build_timeout() == 2.5


def test_real_kernels_without_a_compiler_log_one_line(tmp_path: Path) -> None:
    """The real kernel set in a fresh process with no compiler and an empty cache: every wrapper
    reports None (torch fallback) and stderr holds one line, not one per kernel."""
    code = ("import torch\n"
            "from choral.kernels.paged_attention import PagedAttention\n"
            "from choral.kernels.rms_norm import RmsNorm\n"
            "from choral.kernels.rope_kv import RopeKv\n"
            "from choral.kernels.silu_mul import SiluMul\n"
            "from choral.kernels.small_gemm import SmallGemm\n"
            "loaded = [PagedAttention.load(), RmsNorm.load(torch.float32), RopeKv.load(torch.float32),\n"
            "          SiluMul.load(torch.float32), SmallGemm.load(torch.float32)]\n"
            "print(loaded.count(None))\n")
    env = {**os.environ, "CC": str(tmp_path / "absent-cc"), "CHORAL_CACHE_DIR": str(tmp_path / "cache"),
           "TMPDIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parent.parent)}
    env.pop("CHORAL_NO_KERNELS", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "5"
    (line,) = result.stderr.strip().splitlines()
    assert "no C compiler" in line and "torch" in line
