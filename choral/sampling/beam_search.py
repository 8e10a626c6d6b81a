"""Beam search for one request, step for step the algorithm of transformers' ``_beam_search``.

This file holds only the arithmetic: given the log-probabilities of the running beams it picks
which (beam, token) pairs continue and which hypotheses are finished. The executor maps beams to
sequences and forks their KV blocks (choral/executor/beams.py).

Per step, with W = beam_width and K = max(2, 1 + #eos) * W candidates:

- candidates are the top K of ``running_score[beam] + logprob[beam, token]`` over all beams;
- a candidate *hits* when its token is an end token or the length limit is reached; hits among
  the top W become finished hypotheses scored ``sum_logprobs / length ** length_penalty``;
- the best W candidates that did not hit keep running;
- search stops when no running beam can beat the worst finished one (HF's heuristic: the best
  running score with the current length), when ``early_stopping`` and W hypotheses are finished,
  or when every candidate hit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_NEG = -1.0e9  # HF's "impossible" score


class BeamSearch:
    """State of one request's beam search (scores in fp32, like transformers)."""

    def __init__(self, beam_width: int, length_penalty: float, early_stopping: bool, max_tokens: int,
                 eos_token_ids: Sequence[int]):
        self.width = beam_width
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_tokens = max_tokens
        self.eos_token_ids = set(eos_token_ids)
        self.num_candidates = max(2, 1 + len(self.eos_token_ids)) * beam_width
        # Only beam 0 is real at the start; the others score -1e9 so its tokens are not repeated.
        self.running_scores = torch.full((beam_width,), _NEG)
        self.running_scores[0] = 0.0
        self.running_tokens: list[list[int]] = [[] for _ in range(beam_width)]
        self.finished_scores = torch.full((beam_width,), _NEG)
        self.finished_tokens: list[list[int]] = [[] for _ in range(beam_width)]
        self.is_finished = torch.zeros(beam_width, dtype=torch.bool)
        self.can_improve = True
        self.num_generated = 0
        self.done = False

    def step(self, logprobs: torch.Tensor) -> list[tuple[int, int]]:
        """``logprobs`` [W, V] of the running beams (at the first step the prompt's row repeated).

        Returns the next running beams as (parent beam, token); ``done`` tells whether to stop."""
        width, vocab = logprobs.shape
        # The search's bookkeeping lives on the CPU, whatever device computed the logprobs.
        scores = (logprobs.float().cpu() + self.running_scores[:, None]).reshape(-1)  # [W * V]
        top_scores, top_index = scores.topk(self.num_candidates)
        parents = (top_index // vocab).tolist()
        tokens = (top_index % vocab).tolist()
        length = self.num_generated + 1
        hits = torch.tensor([t in self.eos_token_ids or length >= self.max_tokens for t in tokens])
        candidates = [self.running_tokens[p] + [t] for p, t in zip(parents, tokens, strict=True)]

        # The best W candidates that did not hit keep running.
        running = top_scores + hits.float() * _NEG
        keep = running.topk(width).indices
        self.running_scores = running[keep]
        self.running_tokens = [candidates[i] for i in keep.tolist()]
        next_beams = [(parents[i], tokens[i]) for i in keep.tolist()]

        # Hits among the top W candidates may enter the finished set.
        just_finished = hits & (torch.arange(self.num_candidates) < width)
        finished = top_scores / (length**self.length_penalty)
        if bool(self.is_finished.all()) and self.early_stopping:
            finished = finished + _NEG
        if not self.can_improve:
            finished = finished + _NEG
        finished = finished + (~just_finished).float() * _NEG
        merged_scores = torch.cat([self.finished_scores, finished])
        merged_tokens = self.finished_tokens + candidates
        merged_done = torch.cat([self.is_finished, just_finished])
        best = merged_scores.topk(width).indices
        self.finished_scores = merged_scores[best]
        self.finished_tokens = [merged_tokens[i] for i in best.tolist()]
        self.is_finished = merged_done[best]

        self.num_generated = length
        best_running = self.running_scores[0] / (length**self.length_penalty)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(), torch.tensor(_NEG))
        self.can_improve = self.can_improve and bool((best_running > worst_finished).any())
        open_beam = not (bool(self.is_finished.all()) and self.early_stopping)
        self.done = not (self.can_improve and open_beam and not bool(hits.all()))
        return next_beams

    def results(self, n: int) -> list[tuple[list[int], float]]:
        """The best ``n`` finished hypotheses (tokens, score), best first."""
        return [(self.finished_tokens[i], float(self.finished_scores[i])) for i in range(min(n, self.width))]

    def best_running(self, n: int) -> list[tuple[list[int], float]]:
        """The best ``n`` running beams (tokens, summed logprob), best first: what a search cut short
        (cancelled, timed out) has. Before the first step every beam is empty."""
        if self.num_generated == 0:
            return [([], 0.0) for _ in range(min(n, self.width))]
        return [(self.running_tokens[i], float(self.running_scores[i])) for i in range(min(n, self.width))]

    def fresh(self) -> BeamSearch:
        """A new search with the same settings (a preempted request starts over)."""
        return BeamSearch(self.width, self.length_penalty, self.early_stopping, self.max_tokens,
                          sorted(self.eos_token_ids))
