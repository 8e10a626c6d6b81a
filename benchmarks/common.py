"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Any

import torch


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_hf(path, device: str = "cpu") -> tuple[Any, str]:  # type: ignore[no-untyped-def]
    """The model as an fp32 transformers model on ``device``: an HF directory through
    ``from_pretrained``; a GGUF through ``from_pretrained(gguf_file=...)``, which needs accelerate;
    without it, build the model from its config and load the de-quantized tensors with
    transformers' own GGUF reader (the same tensors, no accelerate)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        how = "from_pretrained(directory)"
    elif is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
        how = "from_pretrained(gguf_file=...)"
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        result = model.load_state_dict(tensors, strict=False)
        tied = config.tie_word_embeddings
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and tied)]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"HF GGUF load: missing {missing}, unexpected {result.unexpected_keys}")
        model.tie_weights()
        how = "from_config + load_gguf_checkpoint (accelerate not installed)"
    model.eval()
    return model.to(device), how


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work, so a host clock times it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: str) -> str:
    """The CPU's model name, or the GPU's."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def add_model_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    """``--model``, ``--device`` and ``--threads``, the same in every benchmark."""
    parser.add_argument("--model", default=default_model,
                        help=f"a bundled model name, .gguf file or HF directory (default {default_model})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def apply_threads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check ``--threads`` and set torch's thread count (torch's own default when not given)."""
    if args.threads is None:
        args.threads = torch.get_num_threads()
    elif args.threads < 1:
        parser.error("--threads must be positive")
    torch.set_num_threads(args.threads)
