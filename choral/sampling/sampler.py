"""The batched sampler: one tensor pass over all rows of a step, whatever each row asks.

Pipeline per step (each stage skipped when no row uses it, identity for rows that don't):

1. ``process`` (changes the logits every row is scored on, greedy rows included):
   named logits processors -> logit_bias -> repetition penalty (prompt + output) ->
   presence/frequency penalties (output only) -> bans (min_tokens, bad words, no-repeat
   n-grams) -> grammar mask.
2. warpers for sampled rows: temperature -> top-k -> top-p -> min-p -> typical-p.
3. the draw: greedy rows take the argmax; sampled rows an inverse-CDF draw whose uniform comes
   from the row's own generator when seeded, so a seed gives the same tokens whatever the batch.

Logprobs are reported from the raw model logits (before any of the above), as vLLM V1 does.

A row is drawn from only when it still has a finite positive mass: after each stage that applied,
a row whose largest logit is NaN, +inf or -inf (everything banned) is blamed on that stage, and
``sample`` raises SamplingError naming the knob before anything is drawn or any grammar advances.
(Without this, a NaN row made the draw return the last vocabulary id every step.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from choral.errors import SamplingError
from choral.sampling import logits_process as lp
from choral.sampling.params import SamplingParams
from choral.sampling.processors import LogitsProcessorRegistry
from choral.sampling.structured import GrammarMatcher, allowed_from_bitmask
from choral.sampling.token_logprobs import TokenLogprobs


class SamplingRow(Protocol):
    """What the sampler reads of one row (a Sequence satisfies it)."""

    @property
    def request_id(self) -> str: ...
    @property
    def params(self) -> SamplingParams: ...
    @property
    def token_ids(self) -> list[int]: ...  # prompt + output
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def generator(self) -> torch.Generator | None: ...
    @property
    def bad_words(self) -> list[tuple[int, ...]]: ...  # token-id form
    @property
    def grammar(self) -> GrammarMatcher | None: ...


@dataclass
class Row:
    """A plain SamplingRow, for callers without a Sequence (benchmarks, tests)."""

    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    generator: torch.Generator | None = None
    request_id: str = ""
    bad_words: list[tuple[int, ...]] = field(default_factory=list)
    grammar: GrammarMatcher | None = None
    # The output presence/frequency penalties count when it is not the tail of token_ids (a
    # conversation's sampled tokens, among its prompts); None: token_ids[num_prompt_tokens:].
    output_token_ids: list[int] | None = None


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: (logprob of the chosen token, [(token, logprob)] top-n), or None when not asked.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    """Turns next-token logits into tokens for a batch of rows."""

    def __init__(self, device: torch.device, seed: int = 0, eos_token_ids: Sequence[int] = (),
                 processors: LogitsProcessorRegistry | None = None):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.eos_token_ids = tuple(eos_token_ids)
        self.processors = processors or LogitsProcessorRegistry()

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
               want_logprobs: Sequence[bool] | None = None) -> SampleResult:
        """logits [B, V] fp32 -> one token per row. Advances each row's grammar matcher.

        ``want_logprobs`` asks for the chosen token's logprob on rows whose params don't
        (best_of ranking)."""
        raw = logits
        params = [r.params for r in rows]
        logits = self.process(logits, rows)  # raises SamplingError for a row left without mass
        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        chosen = torch.empty(len(rows), dtype=torch.long, device=self.device)
        for subset, pick in ((greedy, self._argmax), (sampled, self._draw)):
            if len(subset) == len(rows):  # the whole batch: no gather/scatter
                chosen = pick(logits, params, [r.generator for r in rows])
            elif subset:
                index = torch.tensor(subset, device=self.device)
                chosen.index_copy_(0, index, pick(logits.index_select(0, index), [params[i] for i in subset],
                                                  [rows[i].generator for i in subset]))
        token_ids = chosen.tolist()
        for row, token in zip(rows, token_ids, strict=True):
            if row.grammar is not None:
                row.grammar.accept(token)
        return SampleResult(token_ids, self._logprobs(raw, chosen, params, want_logprobs))

    def process(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Stage 1 of the pipeline: [B, V] -> [B, V] (a new tensor when anything applies).
        Raises SamplingError when a row is left without a finite positive mass."""
        params = [r.params for r in rows]
        vocab = logits.shape[-1]
        dev = self.device
        blame: list[str | None] = [None] * len(rows)
        _blame(logits, _MODEL, blame)
        names = [p.logits_processors for p in params]
        if any(names):
            logits = self.processors.apply(logits.clone(), names, [r.request_id for r in rows],
                                           [r.token_ids for r in rows])
            _blame(logits, "logits_processors", blame)
        bias_rows, bias_ids, bias_vals = [], [], []
        for i, p in enumerate(params):
            for token, bias in p.logit_bias.items():
                if token < vocab:
                    bias_rows.append(i)
                    bias_ids.append(token)
                    bias_vals.append(bias)
        if bias_rows:
            logits = logits.index_put((torch.tensor(bias_rows, device=dev), torch.tensor(bias_ids, device=dev)),
                                      torch.tensor(bias_vals, device=dev, dtype=logits.dtype), accumulate=True)
            _blame(logits, "logit_bias", blame)
        allowed = [(i, p.allowed_token_ids) for i, p in enumerate(params) if p.allowed_token_ids is not None]
        if allowed:
            # Every token but the allowed ones gets -inf (a new tensor: the raw logits feed logprobs).
            keep = torch.zeros_like(logits, dtype=torch.bool)
            for i, ids in allowed:
                keep[i, torch.tensor([t for t in ids if t < vocab], dtype=torch.long, device=dev)] = True
            others = [i for i in range(len(params)) if params[i].allowed_token_ids is None]
            keep[others] = True
            logits = logits.masked_fill(~keep, lp.NEG_INF)
            _blame(logits, "allowed_token_ids", blame)
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            histories, num_prompt = _penalty_histories(rows)
            logits = lp.apply_history_penalties(
                logits, histories, num_prompt,
                torch.tensor([p.repetition_penalty for p in params], device=dev),
                torch.tensor([p.presence_penalty for p in params], device=dev),
                torch.tensor([p.frequency_penalty for p in params], device=dev))
            _blame(logits, "repetition_penalty / presence_penalty / frequency_penalty", blame)
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for i, row in enumerate(rows):
            banned = self._banned(row)
            ban_rows.extend([i] * len(banned))
            ban_ids.extend(banned)
        if ban_rows:
            logits = logits.index_put((torch.tensor(ban_rows, device=dev), torch.tensor(ban_ids, device=dev)),
                                      torch.tensor(lp.NEG_INF, device=dev, dtype=logits.dtype))
            _blame(logits, _BANS, blame)
        constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
        if constrained:
            logits = self._apply_grammar(logits, rows, constrained)
            _blame(logits, "the structured-output constraint (json_schema / regex / grammar)", blame)
        _raise_if_blamed(blame)
        return logits

    def _banned(self, row: SamplingRow) -> list[int]:
        """Tokens this row may not take now (plain Python: only rows using these knobs pay)."""
        p = row.params
        out: list[int] = []
        if row.num_prompt_tokens + p.min_tokens > len(row.token_ids):
            out.extend(self.eos_token_ids)
            out.extend(p.stop_token_ids)
        if row.bad_words:
            out.extend(lp.banned_bad_word_tokens(row.token_ids, row.bad_words))
        if p.no_repeat_ngram_size:
            out.extend(lp.banned_ngram_tokens(row.token_ids, p.no_repeat_ngram_size))
        return out

    def _apply_grammar(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                       constrained: list[int]) -> torch.Tensor:
        vocab = logits.shape[-1]
        words = -(-vocab // 32)
        bitmask = torch.zeros(len(constrained), words, dtype=torch.int32)
        for k, i in enumerate(constrained):
            grammar = rows[i].grammar
            assert grammar is not None
            grammar.fill_bitmask(bitmask[k])
        allowed = allowed_from_bitmask(bitmask.to(self.device), vocab)  # [G, V]
        index = torch.tensor(constrained, device=self.device)
        sub = logits.index_select(0, index).masked_fill(~allowed, lp.NEG_INF)
        return logits.index_copy(0, index, sub)

    @staticmethod
    def _argmax(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
        return logits.argmax(-1)

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams],
              generators: list[torch.Generator | None]) -> torch.Tensor:
        """Warpers, then one draw per row: [R, V] -> [R]."""
        vocab = logits.shape[-1]
        dev = self.device
        temps = torch.tensor([p.temperature for p in params], device=dev)
        logits = logits / temps[:, None]
        blame: list[str | None] = [None] * len(params)
        _blame(logits, "temperature", blame)
        _raise_if_blamed(blame)
        ids = None  # when set, logits are [R, K] over these candidate token ids [R, K]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=dev)
            top_p = torch.tensor([p.top_p for p in params], device=dev)
            compact = lp.top_k_top_p_candidates(logits, top_k, top_p)
            if compact is not None:
                # The rest of the pipeline and the draw run on the K candidates only: exact,
                # since every other token is already out.
                logits, ids = compact
            else:
                logits = lp.apply_top_k_top_p(logits, top_k, top_p)
        if any(p.min_p > 0.0 for p in params):
            logits = lp.apply_min_p(logits, torch.tensor([p.min_p for p in params], device=dev))
        if any(p.typical_p < 1.0 for p in params):
            logits = lp.apply_typical_p(logits, torch.tensor([p.typical_p for p in params], device=dev))
        # Inverse-CDF draw: one uniform per row. A seeded row takes its uniform from its own
        # generator, so its draw does not depend on the rest of the batch; one number per row
        # (not one per vocabulary entry) keeps this a tiny share of the step.
        # The cdf runs in token-id order whatever the path: candidates are put back in id order,
        # so a seeded row's uniform picks the same token with or without the compact path.
        if ids is not None:
            ids, order = ids.sort(dim=-1)
            logits = logits.gather(1, order)
        cdf = logits.softmax(-1).cumsum(-1)  # [R, V] or [R, K]
        u = torch.empty(len(params), device=dev)
        shared = [r for r, g in enumerate(generators) if g is None]
        if shared:
            u[shared] = torch.rand(len(shared), generator=self.generator, device=dev)
        for row, gen in enumerate(generators):
            if gen is not None:
                u[row] = torch.rand(1, generator=gen, device=dev)[0]
        # The first token whose cdf exceeds u * total: never a zero-probability token.
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # [R, 1]
        picked = picked.clamp_(max=logits.shape[-1] - 1)
        return (picked if ids is None else ids.gather(1, picked)).squeeze(1)

    @staticmethod
    def _logprobs(raw: torch.Tensor, chosen: torch.Tensor, params: list[SamplingParams],
                  want: Sequence[bool] | None) -> list[tuple[float, list[tuple[int, float]]] | None]:
        wanted = [p.logprobs is not None or (want is not None and want[i]) for i, p in enumerate(params)]
        if not any(wanted):
            return [None] * len(params)
        logp = raw.log_softmax(-1)
        picked_t = logp.gather(1, chosen[:, None])  # [R, 1]
        picked = picked_t.squeeze(1).tolist()
        ranks = ((logp > picked_t).sum(-1) + 1).tolist()  # vLLM's rank: 1 + tokens strictly more likely
        top_n = max(p.logprobs or 0 for p in params)
        top_vals, top_ids = logp.topk(top_n, dim=-1) if top_n else (None, None)
        out: list[tuple[float, list[tuple[int, float]]] | None] = []
        for row, p in enumerate(params):
            if not wanted[row]:
                out.append(None)
                continue
            tops: list[tuple[int, float]] = []
            if p.logprobs and top_ids is not None and top_vals is not None:
                ids = top_ids[row, : p.logprobs].tolist()
                vals = top_vals[row, : p.logprobs].tolist()
                tops = list(zip(ids, vals, strict=True))
            out.append(TokenLogprobs(picked[row], tops, ranks[row]))
        return out


_MODEL = "the model's own logits (NaN/inf from the weights, the saved state or an overflow)"
_BANS = "bans (min_tokens holding back EOS and stop_token_ids, bad_words, no_repeat_ngram_size)"


def _blame(logits: torch.Tensor, stage: str, blame: list[str | None]) -> None:
    """Mark the rows of ``logits`` [B, V] that ``stage`` left without a finite positive mass (the
    row's max is NaN, +inf, or -inf when every token is out); the first stage to do so keeps the blame."""
    top = logits.amax(-1)  # [B]; NaN anywhere in a row makes its max NaN
    if bool(torch.isfinite(top).all()):
        return
    for i in (~torch.isfinite(top)).nonzero().flatten().tolist():
        if blame[i] is None:
            blame[i] = stage


def _raise_if_blamed(blame: list[str | None]) -> None:
    stage = next((b for b in blame if b is not None), None)
    if stage is not None:
        raise SamplingError(f"{stage}: no token can be drawn: after this step the logits have no finite "
                            "positive probability mass (a NaN or infinite logit, or every token excluded); "
                            "change that setting")


def _penalty_histories(rows: Sequence[SamplingRow]) -> tuple[list[list[int]], list[int]]:
    """Per row, the history the penalties read and where its output starts. A Row with its own
    ``output_token_ids`` reads ``token_ids + output_token_ids`` with the output after all of
    ``token_ids``: the repetition penalty sees the same set of tokens, presence/frequency count
    just that output."""
    histories, num_prompt = [], []
    for r in rows:
        output = getattr(r, "output_token_ids", None)  # only a plain Row has it
        if output is None:
            histories.append(r.token_ids)
            num_prompt.append(r.num_prompt_tokens)
        else:
            histories.append([*r.token_ids, *output])
            num_prompt.append(len(r.token_ids))
    return histories, num_prompt
