"""The sampler's logits transforms, each one tensor pass over a batch of rows.

Every function takes logits [R, V] and per-row parameters as [R] tensors; rows whose knob is
off get the identity (so a batch may mix any parameters). Token-history knobs
(penalties, n-grams, bad words) take plain-Python histories and turn them into one index
tensor per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NEG_INF = float("-inf")


def history_tensor(histories: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Right-pad token lists with ``pad`` into one [R, L] long tensor (L >= 1)."""
    width = max(1, max((len(h) for h in histories), default=0))
    out = torch.full((len(histories), width), pad, dtype=torch.long)
    for row, ids in enumerate(histories):
        if ids:
            out[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return out.to(device)


def token_counts(histories: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float: how often each token occurs in each row's history."""
    ids = history_tensor(histories, vocab, device)  # pad = an extra column, dropped below
    counts = torch.zeros(ids.shape[0], vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL / HF repetition penalty: a seen token's logit is divided by ``penalty`` if positive,
    multiplied if negative. ``seen`` [R, V] bool, ``penalty`` [R] (1 = off)."""
    p = penalty[:, None]
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI penalties: ``logit - frequency * count - presence * (count > 0)`` over the output."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``top_k`` best tokens (V = all), then the smallest set reaching ``top_p``."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], NEG_INF)
    probs = sorted_logits.softmax(-1)
    # Drop a token once the mass before it reaches top_p; the top token always stays. Rows with
    # top_p = 1 are left alone (float rounding could otherwise drop the far tail).
    mass_before = probs.cumsum(-1) - probs
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's top probability."""
    probs = logits.softmax(-1)
    cutoff = probs.max(-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < cutoff, NEG_INF)


def apply_typical_p(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.), as HF's TypicalLogitsWarper: keep the tokens
    whose surprisal is closest to the entropy until their mass reaches ``mass``."""
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).nansum(-1, keepdim=True)  # [R, 1]
    shifted = (-logp - entropy).abs()
    sorted_shift, order = shifted.sort(dim=-1)
    cumulative = logits.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass[:, None]).sum(-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)
    remove_sorted = sorted_shift > sorted_shift.gather(1, last)
    remove_sorted[:, 0] = False  # keep at least one token
    remove = remove_sorted.scatter(1, order, remove_sorted)
    remove &= (mass < 1.0)[:, None]
    return logits.masked_fill(remove, NEG_INF)


def banned_ngram_tokens(token_ids: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``token_ids`` (HF semantics)."""
    if n <= 0 or len(token_ids) + 1 < n:
        return []
    if n == 1:
        return sorted(set(token_ids))
    prefix = tuple(token_ids[len(token_ids) - n + 1 :])
    banned = []
    for start in range(len(token_ids) - n + 1):
        if tuple(token_ids[start : start + n - 1]) == prefix:
            banned.append(token_ids[start + n - 1])
    return banned


def banned_bad_word_tokens(token_ids: Sequence[int], bad_words: Sequence[Sequence[int]]) -> list[int]:
    """Last tokens of bad words whose other tokens the row has just generated."""
    banned = []
    for word in bad_words:
        head = len(word) - 1
        if head == 0 or (len(token_ids) >= head and list(token_ids[len(token_ids) - head :]) == list(word[:head])):
            banned.append(word[-1])
    return banned
