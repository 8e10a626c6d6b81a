"""The batched sampler: one tensor pass over all rows of a step, whatever each row asks.

Rows are described by their SamplingParams; filters run on the whole [B, V] logits at once.
Seeded rows draw their noise from a generator of their own, so a seed gives the same tokens
whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from choral.sampling.params import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: (logprob of the chosen token, [(token, logprob)] top-n), or None when not asked.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    """Turns next-token logits into tokens for a batch of rows."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,  # [B, V] fp32
        params: list[SamplingParams],
        generators: list[torch.Generator | None],  # per row; None = the sampler's own
        banned: list[list[int]] | None = None,  # per row: token ids masked this step (min_tokens)
    ) -> SampleResult:
        raw = logits
        if banned is not None and any(banned):
            logits = logits.clone()
            for row, ids in enumerate(banned):
                if ids:
                    logits[row, ids] = float("-inf")
        chosen = logits.argmax(-1)  # greedy rows are done here; sampled rows overwrite below
        rows = [r for r, p in enumerate(params) if not p.greedy]
        if rows:
            sub_params = [params[r] for r in rows]
            index = torch.tensor(rows, device=self.device)
            picked = self._sample_rows(logits.index_select(0, index), sub_params, [generators[r] for r in rows])
            chosen.index_copy_(0, index, picked)
        return SampleResult(chosen.tolist(), self._logprobs(raw, chosen, params))

    def _sample_rows(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """Temperature, top-k/top-p, min-p, then one draw per row: [R, V] -> [R]."""
        vocab = logits.shape[-1]
        temps = torch.tensor([p.temperature for p in params], device=self.device)
        logits = logits / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            logits = _top_k_top_p(logits, params, self.device)
        if any(p.min_p > 0.0 for p in params):
            probs = logits.softmax(-1)
            min_p = torch.tensor([p.min_p for p in params], device=self.device)
            cutoff = probs.max(-1, keepdim=True).values * min_p[:, None]
            logits = logits.masked_fill(probs < cutoff, float("-inf"))
        probs = logits.softmax(-1)  # [R, V]
        # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p. Seeded rows use
        # their own generator, so their draws do not depend on the rest of the batch.
        noise = torch.empty_like(probs)
        shared = [r for r, g in enumerate(generators) if g is None]
        if shared:
            noise[shared] = torch.empty(len(shared), vocab, device=self.device).exponential_(
                generator=self.generator
            )
        for row, gen in enumerate(generators):
            if gen is not None:
                noise[row].exponential_(generator=gen)
        return (probs / noise).argmax(-1)

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, chosen: torch.Tensor, params: list[SamplingParams]
    ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        wanted = [p.logprobs is not None for p in params]
        if not any(wanted):
            return [None] * len(params)
        logp = raw.log_softmax(-1)
        picked = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
        top_n = max(p.logprobs or 0 for p in params)
        top_vals, top_ids = logp.topk(top_n, dim=-1) if top_n else (None, None)
        out: list[tuple[float, list[tuple[int, float]]] | None] = []
        for row, p in enumerate(params):
            if p.logprobs is None:
                out.append(None)
                continue
            tops: list[tuple[int, float]] = []
            if p.logprobs and top_ids is not None and top_vals is not None:
                ids = top_ids[row, : p.logprobs].tolist()
                vals = top_vals[row, : p.logprobs].tolist()
                tops = list(zip(ids, vals, strict=True))
            out.append((picked[row], tops))
        return out


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams], device: torch.device) -> torch.Tensor:
    vocab = logits.shape[-1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(vocab, device=device)[None, :]
    remove = ranks >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays).
    mass_before = probs.cumsum(-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
