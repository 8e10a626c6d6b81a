"""Beam search as KV forks: a request's running beams mapped onto sequences.

The arithmetic is BeamSearch's (choral/sampling/beam_search.py). Here each running beam is a
sequence: when two beams continue from one parent, the second forks it (``KvCache.fork``: the
child lists the same blocks, the shared partly filled last block is copied on the next write);
a sequence no beam continues is freed. A preempted beam request restarts from its prompt: the
search is deterministic, so it finds the same beams, and preempting a single beam instead would
lose its shared blocks and leave the others waiting for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from choral.executor.job import ExecSequence
from choral.kv.block_pool import blocks_for_tokens
from choral.sampling.beam_search import BeamSearch
from choral.sampling.params import SamplingParams


class BeamGroup:
    """Maps a request's running beams to sequences and reshapes them after each search step."""

    def __init__(self, root: ExecSequence, search: BeamSearch):
        self.root = root
        self.search = search
        self.slots: list[ExecSequence] = [root] * search.width  # at the start every beam is the prompt

    @property
    def live(self) -> list[ExecSequence]:
        """The distinct sequences holding running beams."""
        seen: dict[int, ExecSequence] = {}
        for seq in self.slots:
            seen.setdefault(seq.seq_id, seq)
        return list(seen.values())

    def advance(self, logprobs: dict[int, torch.Tensor],
                make_fork: Callable[[ExecSequence], ExecSequence]) -> tuple[list[ExecSequence], list[ExecSequence]]:
        """One search step from each live sequence's logprobs [V] (by seq_id).

        Returns (forked sequences, sequences no beam continues). When the search is done the
        caller frees every live sequence instead."""
        rows = torch.stack([logprobs[seq.seq_id] for seq in self.slots])  # [W, V]
        beams = self.search.step(rows)
        if self.search.done:
            return [], []
        claimed: set[int] = set()
        new_slots: list[ExecSequence] = []
        forked: list[ExecSequence] = []
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

    def restart(self) -> ExecSequence:
        """Back to the prompt with a fresh search (the caller has freed every beam). Returns the root."""
        self.root.token_ids = list(self.root.prompt_token_ids)
        self.search = self.search.fresh()
        self.slots = [self.root] * self.search.width
        return self.root


def beam_search_for(params: SamplingParams, max_tokens: int, end_ids: set[int]) -> BeamSearch:
    return BeamSearch(params.beam_width, params.length_penalty, params.early_stopping, max_tokens, sorted(end_ids))


def beam_kv_blocks(num_prompt_tokens: int, final_len: int, width: int, block_size: int) -> int:
    """Most KV blocks a beam request holds at once: the prompt's full blocks shared by every beam,
    the rest private to each of ``width`` beams of up to ``final_len`` tokens."""
    shared = num_prompt_tokens // block_size
    return shared + width * (blocks_for_tokens(final_len, block_size) - shared)
