"""DraftModel: a second, cheaper model that proposes tokens for the target to verify.

The draft model (a smaller model with the target's tokenizer, or a quantized copy of the target)
has its own model runner and its own paged KV cache (its own block pool), owned by the engine
core next to the target's. Each speculating sequence has a :class:`DraftProposer`: a
:class:`SequenceState` in the draft's cache that mirrors the target sequence's tokens.

One call proposes for every speculating sequence of a step, batched (:meth:`DraftModel.propose`):

1. sync: each draft sequence keeps its K/V for the longest prefix it shares with the target's
   tokens (the proposals the target rejected are truncated away, blocks left empty freed);
2. catch up: one forward over every sequence's tokens the draft has not seen (the prompt the
   first time, then the accepted tokens and the target's own token), at most
   ``max_catchup_tokens`` in all per call (a long prompt is prefilled over several steps and
   proposes once it is in);
3. draft: then one batched decode per proposed token, each sequence taking the draft's argmax,
   until it has its ``k`` tokens or the draft's probability for its pick falls below the
   request's ``p_min`` (llama.cpp's ``--draft-p-min``): an unsure guess is not worth verifying.

The proposal is a point mass (the argmax), so the executor's verification (draw from the target,
continue while the draw equals the proposal) is exact rejection sampling for it: the output
distribution is the target's, and greedy output is the plain decoding's token for token.

Draft blocks are only ever needed for proposals: when the draft's pool is full, the sequence
that cannot get blocks drops its draft cache and decodes plainly until blocks are free again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from choral.engine.model_runner import Chunk, ModelRunner
from choral.errors import ConfigError
from choral.kv.kv_cache import KvCache
from choral.kv.sequence_state import SequenceState
from choral.loader.load import LoadedModel

MAX_CATCHUP_TOKENS = 512  # draft prefill tokens per call, over all sequences


class DraftProposer:
    """One sequence's view of the draft model (the Proposer protocol); ``close`` frees its blocks."""

    batched = True  # the speculator asks the DraftModel for all its sequences at once

    def __init__(self, model: DraftModel, p_min: float):
        self.model = model
        self.p_min = p_min  # picks the draft is less sure of end the proposal
        self.state = SequenceState()
        self.closed = False

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        return self.model.propose([(self, token_ids, k)])[0]

    def close(self) -> None:
        if not self.closed:
            self.model.release(self)
            self.closed = True


class DraftModel:
    """The draft's runner and KV cache, and the batched proposal loop."""

    def __init__(self, name: str, runner: ModelRunner, kv: KvCache, target_vocab_size: int,
                 max_catchup_tokens: int = MAX_CATCHUP_TOKENS):
        self.name = name  # as the engine was configured (EngineConfig.draft_model)
        self.runner = runner
        self.kv = kv
        self.target_vocab_size = target_vocab_size
        self.max_catchup_tokens = max_catchup_tokens
        self.num_forwards = 0  # draft forwards run (stats, tests)
        self.num_sequences = 0  # open proposers holding draft blocks or tokens

    def proposer(self, p_min: float) -> DraftProposer:
        self.num_sequences += 1
        return DraftProposer(self, p_min)

    def release(self, proposer: DraftProposer) -> None:
        """Give the sequence's draft blocks back (the target sequence finished or was dropped)."""
        if proposer.state.block_table:
            self.kv.free(proposer.state)
        proposer.state.token_ids = []
        self.num_sequences -= 1

    # ---- proposing -----------------------------------------------------------------------------
    def propose(self, items: list[tuple[DraftProposer, Sequence[int], int]]) -> list[list[int]]:
        """Up to ``k`` tokens to follow each ``token_ids`` (the target sequence's tokens), in
        ``items`` order; [] where the draft has nothing to offer this step."""
        out: list[list[int]] = [[] for _ in items]
        budget = self.max_catchup_tokens
        chunks: list[Chunk] = []
        going: list[int] = []  # indices of items in the catch-up forward
        for i, (p, token_ids, k) in enumerate(items):
            if k <= 0 or not token_ids:
                continue
            start = self._sync(p, token_ids)
            if start == len(token_ids):  # every token already computed: recompute the last for its logits
                start -= 1
                self.kv.truncate(p.state, start)
            count = min(len(token_ids) - start, budget)
            if count <= 0 or not self._grow(p, start, start + count):
                continue
            budget -= count
            whole = start + count == len(token_ids)
            chunks.append(Chunk(list(token_ids[start:start + count]), start, p.state.block_table,
                                logits="last" if whole else "none"))
            p.state.num_computed_tokens = start + count
            if whole:
                going.append(i)
        logits = self._forward(chunks)
        rows = [row for row in logits if row is not None]  # the "last" rows: the `going` chunks'
        going = [i for i, row in zip(going, rows, strict=True) if self._take(items[i][0], out[i], row, items[i][2])]
        # Then one token a round for the sequences still going (their last pick fed back).
        while going:
            chunks, fed = [], []
            for i in going:
                p = items[i][0]
                pos = p.state.num_computed_tokens
                if not self._grow(p, pos, pos + 1):
                    continue
                p.state.token_ids.append(out[i][-1])
                p.state.num_computed_tokens = pos + 1
                chunks.append(Chunk([out[i][-1]], pos, p.state.block_table, logits="last"))
                fed.append(i)
            logits = self._forward(chunks)
            going = [i for i, row in zip(fed, logits, strict=True)
                     if row is not None and self._take(items[i][0], out[i], row, items[i][2])]
        return out

    def _sync(self, p: DraftProposer, token_ids: Sequence[int]) -> int:
        """Point the draft sequence at the target's tokens; returns how many of them the draft
        already has K/V for (their common prefix), having dropped the K/V of the rest (the
        proposals the target rejected)."""
        state = p.state
        common = min(state.num_computed_tokens, len(token_ids))
        target = list(token_ids)
        if state.token_ids[:common] != target[:common]:
            common = next(j for j in range(common) if state.token_ids[j] != target[j])
        if common < state.num_computed_tokens:
            self.kv.truncate(state, common)
        state.token_ids = target
        state.num_computed_tokens = common
        return common

    def _grow(self, p: DraftProposer, start: int, end: int) -> bool:
        """Blocks for draft cache indices ``start .. end - 1`` (the draft's own blocks are never
        shared, so no copy is ever needed); False (and the draft cache dropped) when full."""
        copies = self.kv.allocate_slots(p.state, start, end)
        if copies is None:
            self.kv.free(p.state)
            return False
        assert not copies
        return True

    def _forward(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        if not chunks:
            return []
        self.num_forwards += 1
        return self.runner.execute(chunks)

    def _take(self, p: DraftProposer, proposal: list[int], row: torch.Tensor, k: int) -> bool:
        """Append the draft's argmax for ``row`` unless the draft doubts it (probability below
        ``p_min``) or it is outside the target's vocabulary; True while the proposal wants more."""
        probs = torch.softmax(row[-1].float(), dim=-1)
        top, token = torch.max(probs, dim=-1)
        if float(top) < p.p_min or int(token) >= self.target_vocab_size:
            return False
        proposal.append(int(token))
        return len(proposal) < k


def check_same_tokenizer(target: LoadedModel, draft: LoadedModel, name: str) -> None:
    """The draft must map text to the same ids as the target (its proposals are target ids);
    ConfigError naming the difference otherwise. Two models without tokenizers (ids only) need
    the same vocabulary size."""
    t, d = target.tokenizer, draft.tokenizer
    if t is None and d is None:
        if target.spec.vocab_size != draft.spec.vocab_size:
            raise ConfigError(f"draft_model {name!r}: vocabulary of {draft.spec.vocab_size} tokens, the target's "
                              f"has {target.spec.vocab_size}")
        return
    if t is None or d is None:
        which = "the target" if t is None else "the draft model"
        raise ConfigError(f"draft_model {name!r}: {which} has no tokenizer, so the two cannot be checked to "
                          "share one")
    tv, dv = t.hf_tokenizer.get_vocab(), d.hf_tokenizer.get_vocab()
    if tv != dv:
        differ = sorted(set(tv.items()) ^ set(dv.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(f"draft_model {name!r}: its tokenizer differs from the target's ({len(dv)} vs {len(tv)} "
                          f"tokens; e.g. {', '.join(f'{tok!r}={i}' for tok, i in differ)}); a draft model must "
                          "share the target's tokenizer")
    if set(t.eos_token_ids) != set(d.eos_token_ids):
        raise ConfigError(f"draft_model {name!r}: end-of-sequence ids {sorted(d.eos_token_ids)} differ from the "
                          f"target's {sorted(t.eos_token_ids)}")
