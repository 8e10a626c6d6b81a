"""Load a model end to end: resolve -> read spec -> build weights -> tokenizer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from choral.errors import ConfigError, ModelLoadError
from choral.loader.gguf_file import GGUFModelFile
from choral.loader.hf_dir import HFModelDir
from choral.loader.memory import check_fits
from choral.loader.resolve import resolve_model_path
from choral.models.spec import ModelSpec
from choral.models.transformer import DecoderModel
from choral.progress import step
from choral.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """What loading produced: the path, spec, weights (forward), tokenizer and eos ids."""

    path: Path
    spec: ModelSpec
    model: DecoderModel
    tokenizer: Tokenizer | None
    eos_token_ids: tuple[int, ...]
    weights_digest: str  # identifies the weights (file size + mtime + spec) for fingerprints


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA and on CPUs with AMX bf16 tiles, else fp32.

    AVX512-BF16 alone does not say: without AMX, oneDNN's bf16 GEMMs ran at about half the fp32
    rate on a Sapphire Rapids VM (164 vs 304 GFLOP/s) but at twice it on an AMD Zen 4 VM (~430
    vs ~215). fp32 is the safe default there; bf16 is one flag away.
    """
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return torch.bfloat16 if "amx_bf16" in flags else torch.float32


def pick_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but torch sees no CUDA device")
    return device


def _check_memory(path: Path, source: GGUFModelFile | HFModelDir, spec: ModelSpec, dtype: torch.dtype,
                  device: torch.device, max_positions: int) -> None:
    """Refuse, before allocating, a model whose weights and rotary table cannot fit. A GGUF file
    counts at its size on disk (its weights may stay packed); an HF directory at the dense size
    in ``dtype``."""
    elem = torch.empty((), dtype=dtype).element_size()
    weights = path.stat().st_size if isinstance(source, GGUFModelFile) else spec.weight_bytes(elem)
    rotary = 14 * max_positions * spec.head_dim  # fp32 positions, freqs, cat, cos and sin while built
    check_fits({"weights": weights, f"rotary table for {max_positions} positions": rotary}, device,
               "check the model config, or lower max_model_len")


def load_model(model: str, dtype: str, device: str, max_model_len: int | None) -> LoadedModel:
    """Resolve and load ``model`` (a bundled name, a .gguf file or an HF directory)."""
    start = time.perf_counter()
    path = resolve_model_path(model)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    source: GGUFModelFile | HFModelDir
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be .gguf (or pass an HF model directory)")
        source = GGUFModelFile(path)
    else:
        source = HFModelDir(path)
    spec = source.spec
    max_positions = max_model_len or spec.max_position_embeddings
    _check_memory(path, source, spec, torch_dtype, dev, max_positions)
    with step(f"loading {path.name} ({spec.architecture}, {torch_dtype})"):
        decoder = DecoderModel(spec, torch_dtype, dev, max_positions)
        decoder.load_weights(source.iter_tensors())
    digest = None
    if isinstance(source, GGUFModelFile):
        has_vocab = "tokenizer.ggml.model" in source.metadata
        digest = source.reader.kv_digest
    else:
        has_vocab = True
    with step("loading the tokenizer"):
        tokenizer = Tokenizer.from_model_path(path, source.eos_token_ids, digest) if has_vocab else None
    eos = tokenizer.eos_token_ids if tokenizer else tuple(source.eos_token_ids)
    stat = path.stat()
    digest = f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}"
    logger.info("loaded %s (%s, %s) in %.1f s", path, spec.architecture, torch_dtype, time.perf_counter() - start)
    return LoadedModel(path, spec, decoder, tokenizer, eos, digest)
