"""Soft prompts (prompt tuning) and prompt embeddings: vectors that stand in for prompt tokens.

A :class:`SoftPrompt` is an embedding table ``[n_virtual, hidden]`` (PEFT's prompt tuning saves it
as ``prompt_embeddings`` in ``adapter_model.safetensors``). Its vectors replace the input
embeddings of reserved positions of a request's prompt: the positions holding
``placeholder_token_id``, in order, or, without a placeholder, ``n_virtual`` positions put before
the prompt (PEFT's prompt tuning). vLLM's ``prompt_embeds`` is the case where every prompt
position is one.

Placeholder positions keep a token id in the sequence (for bookkeeping: lengths, penalties), but
the forward embeds them from the table. The prefix cache keys the sequence on the table's bytes
(:attr:`SoftPrompt.content_hash`), so a soft prompt never shares KV blocks with other content.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from choral.errors import InvalidRequestError

DEFAULT_PLACEHOLDER = 0  # the token id kept at prepended virtual positions


@dataclass(frozen=True, eq=False)
class SoftPrompt:
    """Vectors ``embeddings`` [n_virtual, hidden] for a prompt's placeholder positions.

    ``placeholder_token_id``: the prompt's positions holding this id take the vectors, in order
    (their count must be ``n_virtual``); None puts ``n_virtual`` virtual positions first."""

    embeddings: torch.Tensor
    placeholder_token_id: int | None = None
    content_hash: int = field(init=False)

    def __post_init__(self) -> None:
        e = self.embeddings
        if not isinstance(e, torch.Tensor) or e.ndim != 2 or e.shape[0] < 1 or not e.is_floating_point():
            raise InvalidRequestError(f"soft_prompt: embeddings must be a float tensor [n_virtual, hidden], got "
                                      f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}")
        table = e.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(table).all():
            raise InvalidRequestError("soft_prompt: embeddings hold NaN or infinite values")
        p = self.placeholder_token_id
        if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p < 0):
            raise InvalidRequestError(f"soft_prompt: placeholder_token_id must be a token id >= 0, got {p!r}")
        object.__setattr__(self, "embeddings", table)
        digest = hashlib.sha256(table.numpy().tobytes()).digest()
        object.__setattr__(self, "content_hash", int.from_bytes(digest[:8], "little"))

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @classmethod
    def from_file(cls, path: str | Path, key: str | None = None,
                  placeholder_token_id: int | None = None) -> SoftPrompt:
        """Read a table from a safetensors file (or a PEFT prompt-tuning directory): the tensor
        ``key``, else ``prompt_embeddings``, else the file's only tensor."""
        from safetensors.torch import load_file

        p = Path(path)
        if p.is_dir():
            p = p / "adapter_model.safetensors"
        try:
            tensors = load_file(str(p))
        except Exception as e:  # missing, truncated or foreign: safetensors' errors vary
            raise InvalidRequestError(f"soft_prompt: cannot read {str(p)!r} ({type(e).__name__}: {e})") from e
        if key is None:
            key = "prompt_embeddings" if "prompt_embeddings" in tensors else (
                next(iter(tensors)) if len(tensors) == 1 else None)
        if key is None or key not in tensors:
            raise InvalidRequestError(f"soft_prompt: {str(p)!r} has no tensor {key or 'prompt_embeddings'!r} "
                                      f"(it has {sorted(tensors)[:5]})")
        return cls(tensors[key], placeholder_token_id)


@dataclass(frozen=True, eq=False)
class SoftTokens:
    """A sequence's soft positions: cache index -> row of ``table`` ([n, hidden], model dtype)."""

    positions: tuple[int, ...]
    table: torch.Tensor
    content_hash: int

    def rows_in(self, start: int, end: int) -> tuple[list[int], list[int]]:
        """(offsets from ``start``, table rows) of the soft positions in ``start .. end - 1``."""
        offsets, rows = [], []
        for row, pos in enumerate(self.positions):
            if start <= pos < end:
                offsets.append(pos - start)
                rows.append(row)
        return offsets, rows


def place(soft: SoftPrompt, token_ids: list[int], hidden_size: int, dtype: torch.dtype,
          device: torch.device) -> tuple[list[int], SoftTokens]:
    """The prompt's token ids with the virtual positions in place, and where the vectors go."""
    if soft.embeddings.shape[1] != hidden_size:
        raise InvalidRequestError(f"soft_prompt: vectors have {soft.embeddings.shape[1]} values, the model's "
                                  f"hidden size is {hidden_size}")
    n = soft.num_virtual_tokens
    if soft.placeholder_token_id is None:
        token_ids = [DEFAULT_PLACEHOLDER] * n + list(token_ids)
        positions = tuple(range(n))
    else:
        positions = tuple(i for i, t in enumerate(token_ids) if t == soft.placeholder_token_id)
        if len(positions) != n:
            raise InvalidRequestError(f"soft_prompt: the prompt holds placeholder {soft.placeholder_token_id} "
                                      f"{len(positions)} times, the soft prompt has {n} vectors")
    table = soft.embeddings.to(device=device, dtype=dtype)
    return token_ids, SoftTokens(positions, table, soft.content_hash)
