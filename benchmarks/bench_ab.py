#!/usr/bin/env python
"""A/B: the engine and executor benchmarks on two revisions of choral, interleaved in one run.

The machine is shared and noisy, so the two trees take turns (A, B, A, B, ...) and each side
reports its median and spread over the rounds. ``--base`` is a git revision checked out into a
temporary worktree; ``--head`` is this checkout's working tree unless given. Each round runs
``bench_engine.py`` (decode ms/step at batch 1/8/32, prefill of 512 tokens) and
``bench_executor.py`` (offline tok/s of a smaller workload) of the *head* tree, with the tree
under test first on ``PYTHONPATH``, so both sides run the same benchmark code.

    python benchmarks/bench_ab.py --base <rev> [--head <rev>] [--rounds 3] [--dtype float32]
        [--requests 32] [--threads N] [--only engine|executor]

Prints a markdown table: per case, A's and B's median (min-max), and B/A (> 1: B is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _worktree(rev: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(into), rev], check=True)
    return into


def _run(tree: Path, script: str, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(out)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=str(HERE))
    return json.loads(out.read_text())


def _engine_cases(doc: dict) -> dict[str, float]:
    """case -> ms (lower is better)."""
    return {f"engine {r['dtype']} {r['case']} b{r['batch']} (ms)": r["ms"] for r in doc["rows"]}


def _executor_cases(doc: dict) -> dict[str, float]:
    """case -> tok/s (higher is better)."""
    return {f"executor {r['dtype']} offline (tok/s)": r["tok_s"] for r in doc["rows"] if r["system"] == "choral"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="revision A (e.g. the commit before a redesign)")
    parser.add_argument("--head", default=None, help="revision B (default: this working tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=32, help="executor benchmark requests (default 32)")
    parser.add_argument("--steps", type=int, default=32, help="engine benchmark decode steps (default 32)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", choices=("engine", "executor"), default=None, help="run one benchmark")
    args = parser.parse_args()
    threads = ["--threads", str(args.threads)] if args.threads else []
    engine_args = ["--dtypes", args.dtype, "--steps", str(args.steps), "--no-hf", *threads]
    executor_args = ["--dtypes", args.dtype, "--requests", str(args.requests), "--max-output", "128",
                     "--no-hf", "--rates", "", *threads]
    with tempfile.TemporaryDirectory(prefix="choral-ab-") as tmp:
        tmp_path = Path(tmp)
        trees = {"A": _worktree(args.base, tmp_path / "a"),
                 "B": _worktree(args.head, tmp_path / "b") if args.head else REPO}
        samples: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
        try:
            for i in range(args.rounds):
                for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    print(f"round {i + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
                    cases: dict[str, float] = {}
                    if args.only in (None, "engine"):
                        cases |= _engine_cases(_run(trees[side], "bench_engine.py", engine_args, tmp_path / "e.json"))
                    if args.only in (None, "executor"):
                        cases |= _executor_cases(_run(trees[side], "bench_executor.py", executor_args,
                                                      tmp_path / "x.json"))
                    for case, value in cases.items():
                        samples[side].setdefault(case, []).append(value)
        finally:
            for tree in trees.values():
                if tree != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"A = {args.base}, B = {args.head or 'working tree'}; {args.rounds} rounds, interleaved; "
          f"load average at the end: {os.getloadavg()[0]:.1f}\n")
    print("| case | A median (min-max) | B median (min-max) | B speed / A speed |")
    print("|---|---|---|---|")
    for case in samples["A"]:
        a, b = samples["A"][case], samples["B"].get(case, [])
        if not b:
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        speed = ma / mb if case.endswith("(ms)") else mb / ma  # > 1: B is faster
        print(f"| {case} | {ma:.1f} ({min(a):.1f}-{max(a):.1f}) | {mb:.1f} ({min(b):.1f}-{max(b):.1f}) "
              f"| {speed:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
