"""Several sequences from one prompt: n > 1 / best_of samples and beam search.

Both are built on forking a sequence: the child lists the same KV blocks (``BlockPool.share``,
one more owner per block), so the prompt's KV is computed once. A shared, partly filled last
block is copied before either sequence writes into it (copy-on-write, done by the engine when
it allocates the sequence's next slot).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from choral.engine.sequence import Sequence, SequenceStatus
from choral.kv.block_pool import BlockPool
from choral.sampling.beam_search import BeamSearch


def fork(seq: Sequence, seq_id: int, index: int, pool: BlockPool) -> Sequence:
    """A new running sequence with ``seq``'s tokens and KV blocks (shared, not copied)."""
    root = seq.root or seq
    child = Sequence(
        seq_id, seq.prompt_token_ids, seq.params, token_ids=list(seq.token_ids),
        num_computed_tokens=seq.num_computed_tokens, block_table=list(seq.block_table),
        status=SequenceStatus.RUNNING, output_logprobs=list(seq.output_logprobs),
        request_id=seq.request_id, bad_words=seq.bad_words,
        grammar=seq.grammar.fork() if seq.grammar is not None else None,
        root=root, index=index, cumulative_logprob=seq.cumulative_logprob,
    )
    pool.share(child.block_table)
    if seq.params.seed is not None:
        # Sample i of a seeded request draws from seed + i (vLLM's rule): distinct, reproducible.
        child.generator = torch.Generator(device=seq.generator.device if seq.generator else "cpu")
        child.generator.manual_seed(seq.params.seed + index)
    root.forks.append(child)
    return child


class BeamGroup:
    """Maps a request's running beams to sequences and reshapes them after each search step."""

    def __init__(self, root: Sequence, search: BeamSearch):
        self.search = search
        self.slots: list[Sequence] = [root] * search.width  # at the start every beam is the prompt

    @property
    def live(self) -> list[Sequence]:
        """The distinct sequences holding running beams."""
        seen: dict[int, Sequence] = {}
        for seq in self.slots:
            seen.setdefault(seq.seq_id, seq)
        return list(seen.values())

    def advance(self, logprobs: dict[int, torch.Tensor],
                make_fork: Callable[[Sequence], Sequence]) -> tuple[list[Sequence], list[Sequence]]:
        """One search step from each live sequence's logprobs [V] (by seq_id).

        Returns (forked sequences, sequences no beam continues). When the search is done the
        engine frees every live sequence instead."""
        rows = torch.stack([logprobs[seq.seq_id] for seq in self.slots])  # [W, V]
        beams = self.search.step(rows)
        if self.search.done:
            return [], []
        claimed: set[int] = set()
        new_slots: list[Sequence] = []
        forked: list[Sequence] = []
        for parent_slot, _ in beams:
            parent = self.slots[parent_slot]
            if parent.seq_id in claimed:  # a second beam from the same parent: fork before appending
                child = make_fork(parent)
                forked.append(child)
                new_slots.append(child)
            else:
                claimed.add(parent.seq_id)
                new_slots.append(parent)
        for seq, (_, token) in zip(new_slots, beams, strict=True):
            seq.token_ids.append(token)
        dropped = [s for s in self.live if s.seq_id not in claimed]
        self.slots = new_slots
        return forked, dropped
