#!/usr/bin/env python
"""An HF model directory with the bundled model's shape and tokenizer but random weights.

Speed depends on a model's shape, not on its weight values, so a "twin" stands in for the
bundled GGUF where that file cannot go (the 98 MB GGUF is over the size a lent GPU machine
accepts). Two steps, so the heavy part runs where the twin is used:

    # here: config.json, generation_config.json, tokenizer files (a few MB, no weights)
    python benchmarks/random_twin.py describe OUT_DIR [--model smollm2-135m-instruct]
    # there: random weights (seeded normal, std = initializer_range) as model.safetensors
    python benchmarks/random_twin.py weights OUT_DIR [--seed 0]

Both benchmarks then take ``--model OUT_DIR``. The outputs of a twin are meaningless text:
the benchmarks ignore EOS, so every request still runs to its full length.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def describe(out: Path, model: str) -> None:
    from transformers import AutoConfig, GenerationConfig

    from choral.loader.resolve import resolve_model_path
    from choral.tokenizer import Tokenizer

    path = resolve_model_path(model)
    if path.suffix != ".gguf":
        raise SystemExit(f"{path}: describe reads a GGUF file (an HF directory is its own twin)")
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    config.dtype = "float32"
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(str(out))
    tokenizer = Tokenizer.from_model_path(path, [config.eos_token_id])
    if tokenizer is None:
        raise SystemExit(f"{path}: no tokenizer in the GGUF")
    tokenizer.hf_tokenizer.save_pretrained(str(out))
    print(f"wrote {out}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}")


def weights(out: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(out))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}/model.safetensors: {params / 1e6:.1f}M parameters (random, seed {seed})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    d = sub.add_parser("describe", help="config + tokenizer, no weights")
    d.add_argument("out", type=Path)
    d.add_argument("--model", default="smollm2-135m-instruct")
    w = sub.add_parser("weights", help="random weights for a described directory")
    w.add_argument("out", type=Path)
    w.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.step == "describe":
        describe(args.out, args.model)
    else:
        weights(args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
