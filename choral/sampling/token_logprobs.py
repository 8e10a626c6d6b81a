"""One token's logprobs as the sampler reports them."""

from __future__ import annotations


class TokenLogprobs(tuple):  # type: ignore[type-arg]
    """``(logprob, [(token_id, logprob), ...] top-n)``, a plain 2-tuple to every reader, plus
    ``rank``: 1 + the number of tokens the model found strictly more likely (vLLM's rank; the top
    list alone cannot say it for a token outside the top n)."""

    rank: int

    def __new__(cls, logprob: float, top: list[tuple[int, float]], rank: int) -> TokenLogprobs:
        entry = super().__new__(cls, (logprob, top))
        entry.rank = rank
        return entry

    def __reduce__(self) -> tuple[type[TokenLogprobs], tuple[float, list[tuple[int, float]], int]]:
        return TokenLogprobs, (self[0], self[1], self.rank)  # pickle / deepcopy keep the rank
