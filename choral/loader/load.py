"""Load a model end to end: resolve -> read spec -> build weights -> tokenizer."""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from choral.distributed.shard import plan_shards
from choral.errors import ConfigError, ModelLoadError
from choral.loader.gguf_file import GGUFModelFile
from choral.loader.hf_dir import HFModelDir
from choral.loader.memory import check_fits
from choral.loader.resolve import resolve_model_path
from choral.models.spec import ModelSpec
from choral.models.transformer import DecoderModel, Weight
from choral.progress import step
from choral.quant.kernels import kernel_available
from choral.quant.quantize import quantize_tensors
from choral.quant.repack import GGUF_TYPES
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
    # > 1: ``model`` holds one tensor-parallel rank's shard (its spec is the shard's, ``spec`` the
    # whole model's); its forward is only right inside the group (choral/engine/tp_runner.py).
    tensor_parallel_size: int = 1

    @property
    def weights_mode(self) -> str:
        """``native`` (quantized weights kept packed) or ``dequantize``."""
        return "native" if self.model.native else "dequantize"


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


def load_model(model: str, dtype: str, device: str, max_model_len: int | None, weights: str = "auto",
               quantization: str | None = None, tp_rank: int = 0, tp_size: int = 1,
               with_tokenizer: bool = True) -> LoadedModel:
    """Resolve and load ``model`` (a bundled name, a .gguf file or an HF directory).

    ``weights`` and ``quantization`` as in EngineConfig (already validated against each other).
    ``tp_size`` > 1: load only tensor-parallel rank ``tp_rank``'s slices (choral/distributed/shard.py;
    dequantized weights only). ``with_tokenizer=False``: weights only (a tensor-parallel worker,
    which never sees text)."""
    start = time.perf_counter()
    path = resolve_model_path(model)
    dev = pick_device(device)
    source: GGUFModelFile | HFModelDir
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be .gguf (or pass an HF model directory)")
        source = GGUFModelFile(path)
    else:
        source = HFModelDir(path)
    native = _native_weights(source, weights, quantization, dtype, dev)
    torch_dtype = torch.float32 if native else pick_dtype(dtype, dev)
    spec = source.spec
    shard = plan_shards(spec, tp_size)[tp_rank] if tp_size > 1 else None
    max_positions = max_model_len or spec.max_position_embeddings
    _check_memory(path, source, spec, torch_dtype, dev, max_positions)
    mode = "native" if native else "dequantized"
    with step(f"loading {path.name} ({spec.architecture}, {torch_dtype}, {mode} weights)"):
        if shard is not None and native:
            raise ConfigError("tensor_parallel_size: quantized weights kept packed cannot be split over ranks; "
                              "use weights='dequantize'")
        decoder = DecoderModel(spec if shard is None else shard.local_spec(spec), torch_dtype, dev, max_positions,
                               native=native)
        tensors: Iterable[tuple[str, Weight]]
        if quantization is not None:
            tensors = quantize_tensors(source.iter_tensors(), quantization)
        elif isinstance(source, GGUFModelFile):
            tensors = source.iter_tensors(keep_packed=native)
        else:
            tensors = source.iter_tensors()
        decoder.load_weights(tensors if shard is None else shard.select(spec, tensors))
    with step("loading the tokenizer"):
        tokenizer = _tokenizer_of(path, source) if with_tokenizer else None
    eos = tokenizer.eos_token_ids if tokenizer else tuple(source.eos_token_ids)
    if native:
        _return_freed_memory()
    stat = path.stat()
    digest = f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}"
    if quantization is not None:
        digest += f":{quantization}"
    logger.info("loaded %s (%s, %s, %s weights) in %.1f s", path, spec.architecture, torch_dtype,
                "native" if native else "dequantized", time.perf_counter() - start)
    return LoadedModel(path, spec, decoder, tokenizer, eos, digest, shard.world if shard is not None else 1)


def load_tokenizer(model: str) -> Tokenizer | None:
    """``model``'s tokenizer and chat template exactly as :func:`load_model` builds them, without
    the weights (a replica router tokenizes prompts as its replicas do); None when it has none."""
    path = resolve_model_path(model)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be .gguf (or pass an HF model directory)")
        return _tokenizer_of(path, GGUFModelFile(path))
    return _tokenizer_of(path, HFModelDir(path))


def _tokenizer_of(path: Path, source: GGUFModelFile | HFModelDir) -> Tokenizer | None:
    digest = None
    if isinstance(source, GGUFModelFile):
        has_vocab = "tokenizer.ggml.model" in source.metadata
        digest = source.reader.kv_digest
    else:
        has_vocab = True
    arch = source.architecture
    return Tokenizer.from_model_path(path, source.eos_token_ids, digest, arch.stop_tokens,
                                     arch.default_chat_template) if has_vocab else None


def _native_weights(source: GGUFModelFile | HFModelDir, weights: str, quantization: str | None, dtype: str,
                    device: torch.device) -> bool:
    """Whether this load keeps quantized weights packed (EngineConfig.weights says how to decide)."""
    packed_types = sorted(t for t in source.quantized_types() if t in GGUF_TYPES) \
        if isinstance(source, GGUFModelFile) else []
    if quantization is not None:
        if packed_types:
            raise ConfigError(f"quantization: {source.path} is already quantized ({', '.join(packed_types)}); "
                              "quantization= applies to float weights")
        _require_kernel()
        return True
    if weights == "native":
        if not packed_types:
            raise ConfigError(f"weights: {source.path} has no quantized tensors to keep packed; "
                              "pass quantization='q8_0' or 'q4_0' to quantize it at load")
        _require_kernel()
        return True
    return (weights == "auto" and bool(packed_types) and device.type == "cpu"
            and dtype in ("auto", "float32") and kernel_available())


def _return_freed_memory() -> None:
    """Hand the heap pages that repacking's numpy temporaries freed back to the OS (glibc keeps
    them otherwise: ~40 MB of resident memory for the bundled model)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _require_kernel() -> None:
    if not kernel_available():
        raise ConfigError("weights: native quantized weights need the C kernel (quant_matmul.c), which did not "
                          "compile here (no C compiler, or CHORAL_NO_KERNELS=1); use weights='dequantize'")
