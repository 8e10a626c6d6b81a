"""Start-up timings: ``import choral``, ``choral --help``, and loading the bundled model stage by
stage, warm (caches built) and optionally cold (an empty cache: kernels compiled, tokenizer
converted), next to the machine's own floor (a bare interpreter, ``import torch``), the way
choral read the same file before (the gguf package's reader, transformers' tokenizer) and
llama.cpp's load time for the same file when the peers' llama.cpp build is present.

Every measurement runs in a fresh interpreter, ``--repeat`` times; the table shows the median and
the spread (min-max). Usage::

    python benchmarks/bench_startup.py [--model smollm2-135m-instruct] [--repeat 5] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each probe prints one JSON object of stage -> seconds on its last line.
_LOAD_STAGES = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from choral.loader.load import load_model
from choral.loader.gguf_file import GGUFModelFile
from choral.loader.resolve import resolve_model_path
t2 = time.perf_counter()
path = resolve_model_path(sys.argv[1])
GGUFModelFile(path)
t3 = time.perf_counter()
loaded = load_model(sys.argv[1], "float32", "cpu", None)
t4 = time.perf_counter()
from choral import LLM
llm = LLM(sys.argv[1], dtype="float32")
t5 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import choral's loader": t2 - t1, "GGUF metadata + spec": t3 - t2,
                  "load_model (metadata, weights, tokenizer)": t4 - t3, "LLM(...) total": t5 - t4}))
"""

_BEFORE = """
import json, os, sys, time
from choral.loader.resolve import resolve_model_path
path = resolve_model_path(sys.argv[1])
t0 = time.perf_counter()
import gguf
reader = gguf.GGUFReader(str(path))
for field in reader.fields.values():
    field.contents()
t1 = time.perf_counter()
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoTokenizer
t2 = time.perf_counter()
from choral.tokenizer import _gguf_tokenizer_dir
AutoTokenizer.from_pretrained(str(_gguf_tokenizer_dir(path, None)))
t3 = time.perf_counter()
print(json.dumps({"gguf package: read metadata": t1 - t0, "import transformers": t2 - t1,
                  "transformers tokenizer from the cache": t3 - t2}))
"""

_AFTER = """
import json, sys, time
from choral.loader.resolve import resolve_model_path
path = resolve_model_path(sys.argv[1])
t0 = time.perf_counter()
from choral.gguf_reader import GGUFReader
reader = GGUFReader(path)
t1 = time.perf_counter()
from choral.tokenizer import Tokenizer, _gguf_tokenizer_dir
Tokenizer.from_saved(_gguf_tokenizer_dir(path, reader.kv_digest), [])
t2 = time.perf_counter()
print(json.dumps({"choral: read metadata": t1 - t0, "choral: tokenizer from the cache": t2 - t1}))
"""


def _run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])}... failed:\n{done.stderr[-2000:]}")
    return wall, done.stdout + done.stderr


def _probe(code: str, model: str, env: dict[str, str] | None = None) -> tuple[float, dict[str, float]]:
    wall, out = _run([sys.executable, "-c", code, model], env)
    line = [x for x in out.splitlines() if x.startswith("{")][-1]
    return wall, json.loads(line)


def _llama_cpp_bin() -> Path | None:
    peers = Path(os.environ.get("PEERS_DIR", Path.home() / ".cache" / "choral-peers"))
    for tool in sorted(peers.glob("llama.cpp-*/build/bin/llama-batched-bench")):
        return tool
    return None


def _llama_cpp_load(tool: Path, path: Path) -> tuple[float, float | None]:
    """(process wall time, llama.cpp's own reported load time if it prints one) for a 1-token run."""
    wall, out = _run([str(tool), "-m", str(path), "-c", "64", "-b", "64", "-ub", "64", "-npp", "1", "-ntg", "1",
                      "-npl", "1", "-t", "2"])
    match = re.search(r"load time\s*=\s*([\d.]+) ms", out)
    return wall, (float(match.group(1)) / 1000 if match else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also time a load with an empty cache (compiles kernels)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from choral.loader.resolve import resolve_model_path

    path = resolve_model_path(args.model)
    rows: dict[str, list[float]] = {}

    def add(name: str, value: float | None) -> None:
        if value is not None:
            rows.setdefault(name, []).append(value)

    env = dict(os.environ, PYTHONPATH=str(ROOT), CHORAL_PROGRESS="0")
    _probe(_LOAD_STAGES, args.model, env)  # warm every cache first
    tool = _llama_cpp_bin()
    for _ in range(args.repeat):
        add("python -c pass (the interpreter's floor)", _run([sys.executable, "-c", "pass"], env)[0])
        add("python -c 'import choral'", _run([sys.executable, "-c", "import choral"], env)[0])
        add("choral --help", _run([sys.executable, "-m", "choral.cli", "--help"], env)[0])
        add("python -c 'import torch'", _run([sys.executable, "-c", "import torch"], env)[0])
        for stage, seconds in _probe(_LOAD_STAGES, args.model, env)[1].items():
            add(f"warm: {stage}", seconds)
        for stage, seconds in _probe(_BEFORE, args.model, env)[1].items():
            add(f"before: {stage}", seconds)
        for stage, seconds in _probe(_AFTER, args.model, env)[1].items():
            add(f"after: {stage}", seconds)
        if tool is not None:
            wall, reported = _llama_cpp_load(tool, path)
            add("llama.cpp: llama-batched-bench process (load + 1 token)", wall)
            add("llama.cpp: its reported load time", reported)
        if args.cold:
            with tempfile.TemporaryDirectory() as cache:
                cold_env = dict(env, CHORAL_CACHE_DIR=cache)
                for stage, seconds in _probe(_LOAD_STAGES, args.model, cold_env)[1].items():
                    add(f"cold: {stage}", seconds)

    load = os.getloadavg()
    print(f"\n## choral start-up: {path.name}, {args.repeat} runs each, fresh interpreter per run")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}\n")
    print(f"| {'what':<58} | median s | min-max s |")
    print(f"|{'-' * 60}|---------:|----------:|")
    for name, values in rows.items():
        print(f"| {name:<58} | {statistics.median(values):8.3f} | {min(values):.3f}-{max(values):.3f} |")
    if tool is None:
        print("\nllama.cpp: absent (build it with the peers' build_llama_cpp.sh to compare load times)")
    ratios = [("metadata", "before: gguf package: read metadata", "after: choral: read metadata"),
              ("tokenizer", "before: transformers tokenizer from the cache", "after: choral: tokenizer from the cache")]
    for what, before, after in ratios:
        if before in rows and after in rows:
            b, a = statistics.median(rows[before]), statistics.median(rows[after])
            print(f"{what}: {b:.3f} s before -> {a:.3f} s now ({b / max(a, 1e-9):.0f}x)")
    llama = rows.get("llama.cpp: its reported load time") or rows.get(
        "llama.cpp: llama-batched-bench process (load + 1 token)")
    ours = rows.get("warm: load_model (metadata, weights, tokenizer)")
    if llama and ours:
        print(f"load: choral {statistics.median(ours):.2f} s vs llama.cpp {statistics.median(llama):.2f} s "
              f"({statistics.median(ours) / max(statistics.median(llama), 1e-9):.1f}x)")


if __name__ == "__main__":
    main()
