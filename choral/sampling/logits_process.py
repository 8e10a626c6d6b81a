"""The sampler's logits transforms, each one tensor pass over a batch of rows.

Every function takes logits [R, V] and per-row parameters as [R] tensors; rows whose knob is
off get the identity (so a batch may mix any parameters). Token-history knobs
(penalties, n-grams, bad words) take plain-Python histories and turn them into one index
tensor per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from choral.errors import InvalidRequestError

if TYPE_CHECKING:
    from choral.sampling.params import SamplingParams

NEG_INF = float("-inf")


def history_tensor(histories: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Right-pad token lists with ``pad`` into one [R, L] long tensor (L >= 1)."""
    width = max(1, max((len(h) for h in histories), default=0))
    out = torch.full((len(histories), width), pad, dtype=torch.long)
    for row, ids in enumerate(histories):
        if ids:
            out[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return out.to(device)


def apply_history_penalties(logits: torch.Tensor, histories: Sequence[Sequence[int]],
                            num_prompt_tokens: Sequence[int], repetition: torch.Tensor,
                            presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Repetition penalty (CTRL/HF, over prompt + output) and presence/frequency penalties
    (OpenAI, over the output only), touching only the [R, L] history positions, not [R, V].

    Repetition: a seen token's logit is divided by the penalty if positive, multiplied if
    negative. Presence/frequency: ``logit - frequency * count - presence * (count > 0)``.
    Knobs at 1 / 0 leave a row unchanged."""
    rows, vocab = logits.shape
    dev = logits.device
    # An extra column absorbs the padding, so every gather/scatter below needs no mask.
    ext = torch.cat([logits, torch.zeros(rows, 1, dtype=logits.dtype, device=dev)], dim=1)  # [R, V + 1]
    ids = history_tensor(histories, vocab, dev)  # [R, L]
    seen = ext.gather(1, ids)
    p = repetition[:, None]
    seen = torch.where(seen > 0, seen / p, seen * p)
    # Counts over the output part only: positions before num_prompt_tokens go to the pad column.
    positions = torch.arange(ids.shape[1], device=dev)[None, :]
    out_ids = ids.masked_fill(positions < torch.tensor(list(num_prompt_tokens), device=dev)[:, None], vocab)
    counts = torch.zeros(rows, vocab + 1, dtype=logits.dtype, device=dev)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
    count = counts.gather(1, ids)  # [R, L]: output count of each history token
    seen = seen - frequency[:, None] * count - presence[:, None] * (count > 0).to(logits.dtype)
    ext.scatter_(1, ids, seen)  # duplicates of a token write the same value
    return ext[:, :vocab]


TOP_P_CANDIDATES = 1024  # top-p looks at the best 1024 tokens first; a full sort only if they fall short


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``top_k`` best tokens (V = all), then the smallest set of them whose mass
    (renormalized over the top-k set, as HF's TopK then TopP warpers) reaches ``top_p``.
    Returns [R, V] logits with the dropped tokens at -inf; rows with neither knob are unchanged."""
    vocab = logits.shape[-1]
    filtered = (top_k < vocab) | (top_p < 1.0)
    if not bool(filtered.any()):
        return logits
    index = filtered.nonzero().squeeze(1)
    sub, sub_k, sub_p = logits.index_select(0, index), top_k[index], top_p[index]
    compact = top_k_top_p_candidates(sub, sub_k, sub_p)
    if compact is None:  # a flat distribution: its top_p mass is not among the candidates
        sub = _top_k_top_p_sorted(sub, sub_k, sub_p)
    else:
        values, ids = compact
        sub = torch.full_like(sub, NEG_INF).scatter_(1, ids, values)
    return logits.index_copy(0, index, sub)


def top_k_top_p_candidates(logits: torch.Tensor, top_k: torch.Tensor,
                           top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-k/top-p on K candidates instead of a sort of the vocabulary (a [32, 49152] sort is
    ~30x slower than ``topk``): returns (logits [R, K] with dropped ones at -inf, token ids [R, K]),
    every kept token being among them. K covers every row's top_k; a row without top-k uses
    TOP_P_CANDIDATES and must find top_p of the mass there. None when some row needs the whole
    vocabulary (no filter at all, or a flat distribution): the caller then sorts."""
    vocab = logits.shape[-1]
    # Candidates: every row's top_k, or TOP_P_CANDIDATES for rows without one.
    k = min(vocab, int(torch.where(top_k < vocab, top_k, TOP_P_CANDIDATES).max()))
    cand_logits, cand = logits.topk(k, dim=-1)  # [R, K], best first
    whole = top_k >= vocab  # no top-k: mass is out of the whole vocabulary
    # Probabilities up to a per-row factor: a top-k row's mass is renormalized over its top-k set
    # below, so the factor cancels and its best logit will do; only rows without top-k need the
    # vocabulary's logsumexp (a pass over [R, V] that costs as much as the topk itself).
    norm = cand_logits[:, :1]
    if bool(whole.any()):
        norm = torch.where(whole[:, None], logits.logsumexp(-1, keepdim=True), norm)
    cand_probs = (cand_logits - norm).exp()
    in_k = torch.arange(k, device=logits.device)[None, :] < top_k[:, None]
    cand_probs = cand_probs * in_k
    covered = cand_probs.sum(-1)
    if bool((whole & ((top_p >= 1.0) | (covered < top_p))).any()):
        return None
    total = torch.where(whole, torch.ones_like(top_p), covered)
    # Drop a token once the mass before it reaches top_p; the top token always stays.
    mass_before = (cand_probs.cumsum(-1) - cand_probs) / total[:, None]
    keep = in_k & ~((mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0))
    return cand_logits.masked_fill(~keep, NEG_INF), cand


def _top_k_top_p_sorted(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], NEG_INF)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's top probability:
    p / p_max = exp(logit - max_logit), so no softmax is needed."""
    cutoff = logits.max(-1, keepdim=True).values + min_p[:, None].log()  # log 0 = -inf keeps all
    return logits.masked_fill(logits < cutoff, NEG_INF)


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


def bad_word_token_ids(bad_words: Sequence[tuple[int, ...] | str], tokenizer: Any) -> list[tuple[int, ...]]:
    """``SamplingParams.bad_words`` in token-id form. A string is tokenized alone and after a
    space (a different token in BPE vocabularies), like vLLM."""
    out: list[tuple[int, ...]] = []
    for word in bad_words:
        if isinstance(word, tuple):
            out.append(word)
            continue
        if tokenizer is None:
            raise InvalidRequestError("bad_words: strings need a tokenizer; give token id lists")
        for text in (word, " " + word):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False, field="bad_words"))
            if ids and ids not in out:
                out.append(ids)
    return out


def check_token_ids(params: SamplingParams, vocab_size: int, tokenizer: Any) -> list[tuple[int, ...]]:
    """Check every token id ``params`` names (stop_token_ids, logit_bias, bad_words once tokenized,
    allowed_token_ids)
    against a vocabulary of ``vocab_size``, and return the bad words in token-id form.

    The sampler indexes the logits with these ids, so one out of range would fail mid-step:
    callers run this before they take a request (the executor's intake, ``Conversation.sample``).
    """
    bad_words = bad_word_token_ids(params.bad_words, tokenizer)
    named = (("stop_token_ids", params.stop_token_ids), ("logit_bias", tuple(params.logit_bias)),
             ("bad_words", tuple(t for word in bad_words for t in word)),
             ("allowed_token_ids", params.allowed_token_ids or ()))
    for name, ids in named:
        for t in ids:
            if not 0 <= t < vocab_size:
                raise InvalidRequestError(f"{name}: token id {t} is out of range [0, {vocab_size})")
    return bad_words
