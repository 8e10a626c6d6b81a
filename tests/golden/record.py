"""Record the golden outputs: ``python -m tests.golden.record`` from the repository root.

Writes tests/golden/outputs.json. Run it only when a change of outputs is deliberate."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import make_tiny_model
from tests.golden.cases import CASES, Context, run_case

TINY_ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")
OUTPUT = Path(__file__).with_name("outputs.json")


def build_context(root: Path) -> Context:
    from choral import LLM

    tiny = {}
    for arch in TINY_ARCHS:
        directory = root / f"tiny-{arch}"
        directory.mkdir()
        make_tiny_model(arch, directory)
        tiny[arch] = directory
    llm = LLM("smollm2-135m-instruct", dtype="float32", weights="dequantize", kv_cache_tokens=8192,
              max_model_len=2048)
    return Context(llm, tiny)


def main() -> None:
    names = sys.argv[1:] or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = build_context(Path(tmp))
        stored = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
        for name in names:
            start = time.perf_counter()
            stored[name] = run_case(name, ctx)
            print(f"{name}: {time.perf_counter() - start:.1f}s", flush=True)
        ctx.llm.close()
    OUTPUT.write_text(json.dumps({k: stored[k] for k in sorted(stored)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
