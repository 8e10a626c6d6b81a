"""A conversation's embeddings prompt (LLamaSharp's and llama.cpp's embeddings mode): the final
hidden states of the last prompt's tokens, collected as its chunks are computed, then pooled.

The hidden states are the final norm's output, what the lm_head reads; every token has attended
to the whole conversation before it. ``last`` pools the last token's state, ``mean`` averages
the prompt's tokens; L2-normalized unless asked not to.
"""

from __future__ import annotations

import torch

from choral.errors import InvalidRequestError

POOLINGS = ("last", "mean")


class PromptEmbeddings:
    """Hidden states of one prompt: wanted or not, collected chunk by chunk."""

    def __init__(self) -> None:
        self.wanted = False
        self._chunks: list[torch.Tensor] = []
        self._rows: torch.Tensor | None = None  # [prompt tokens, hidden] fp32 once the prompt is computed

    @property
    def mode(self) -> str:
        """What the model runner returns for this conversation's chunks (see Chunk.hidden)."""
        return "all" if self.wanted else "none"

    @property
    def ready(self) -> bool:
        return self._rows is not None

    def start(self, wanted: bool) -> None:
        """A new prompt: forget the last one's states."""
        self.wanted, self._chunks, self._rows = wanted, [], None

    def add(self, rows: torch.Tensor | None, prompt_done: bool) -> None:
        """One computed chunk's states ([n, hidden]); the prompt's last chunk completes them."""
        if not self.wanted:
            return
        if rows is not None:
            self._chunks.append(rows)
        if prompt_done and self._chunks:
            self._rows = torch.cat(self._chunks)
            self._chunks = []

    def copy(self) -> PromptEmbeddings:
        twin = PromptEmbeddings()
        twin.wanted, twin._rows = self.wanted, self._rows
        return twin

    def pooled(self, pooling: str, normalize: bool) -> torch.Tensor | None:
        """[hidden] fp32, or None when the last prompt did not ask for embeddings."""
        if pooling not in POOLINGS:
            raise InvalidRequestError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
        if self._rows is None:
            return None
        vector = self._rows.mean(dim=0) if pooling == "mean" else self._rows[-1]
        return torch.nn.functional.normalize(vector, dim=0) if normalize else vector.clone()
