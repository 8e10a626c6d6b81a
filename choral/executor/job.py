"""Per-request state inside the executor: a Job owns its sequences (one per sample, or the beams)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from choral.engine.sequence import Sequence
from choral.engine.soft_prompt import SoftTokens
from choral.executor.request import Request, Response, Timing
from choral.finish import Finisher, FinishReason, StopConditions
from choral.lora.adapter import LoraAdapter

if TYPE_CHECKING:
    from choral.executor.beams import BeamGroup
    from choral.speculative.speculator import SpecState


@dataclass(eq=False)
class ExecSequence(Sequence):
    """A sequence plus what the executor tracks about it."""

    job: Job | None = None
    index: int = 0  # sample number within the request (seeds: seed + index); beams count their forks
    finisher: Finisher | None = None  # its output's text and stop checks
    finish: FinishReason = FinishReason.NOT_FINISHED
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    sent_tokens: int = 0  # output tokens already handed out in streamed responses
    sent_logprobs: int = 0
    spec: SpecState | None = None  # speculative decoding: proposer, adaptive length, counts


@dataclass(eq=False)
class Job:
    """One request: its sequences, timing and where its responses go.

    ``sequences`` are the request's samples (index order) for sampling, and only the root for
    beam search, whose running beams the ``beam`` group tracks. ``returned`` is filled when the
    request ends: the sequences handed back, in output order (best_of: the n most likely;
    beams: the n best hypotheses)."""

    request: Request
    prompt_token_ids: list[int]
    timing: Timing
    deadline: float | None
    collect: bool  # submit()/poll(): keep a final Completion instead of queueing responses
    stop_conditions: StopConditions  # when its sequences end (each has its own Finisher)
    request_id: int = -1  # given when the executor accepts the request
    arrival_order: int = -1
    sequences: list[ExecSequence] = field(default_factory=list)
    returned: list[ExecSequence] = field(default_factory=list)
    responses: deque[Response] = field(default_factory=deque)
    done: bool = False
    forked: bool = False  # the other samples have been forked off sequence 0
    released: bool = False  # nobody will collect it: forget it as soon as it is done
    bad_words: list[tuple[int, ...]] = field(default_factory=list)  # token-id form, for every sample
    beam: BeamGroup | None = None  # beam search (beam_width > 1)
    num_forks: int = 0  # sequences forked so far (beams number theirs from this)
    error: str | None = None  # why the request failed on its own (its answer is an error Response)
    error_cause: Exception | None = None  # the exception behind ``error``, when there was one
    # The prompt as text, put before the output when exclude_input_from_output is False: the
    # prompt itself, or its tokens decoded (token ids, rendered chat messages).
    prompt_text: str | None = None
    unbatched: bool = False  # pin_prefix's own prefill: admitted whatever the batching strategy waits for
    lora: LoraAdapter | None = None  # resolved from request.lora at intake; every sequence runs with it
    soft: SoftTokens | None = None  # request.soft_prompt placed in the prompt; every sequence embeds it

    @property
    def ended(self) -> bool:
        """Finished, cancelled, timed out or failed: its final answer is given (or on its way)."""
        return self.done or self.error is not None or bool(self.returned)

    @property
    def root(self) -> ExecSequence:
        return self.sequences[0]

    @property
    def num_samples(self) -> int:
        """Sequences the request runs: best_of (or n) samples, or beam_width beams."""
        return self.request.sampling.num_samples

    @property
    def ranked(self) -> bool:
        """best_of > n: the samples are ranked by cumulative logprob at the end, n returned."""
        return self.beam is None and self.num_samples > self.request.sampling.n

    def effective_priority(self, now: float, aging_per_s: float) -> float:
        """Priority plus what waiting has earned: a stream of high-priority arrivals cannot
        starve an old low-priority request forever."""
        return self.request.priority + aging_per_s * (now - self.timing.arrival)
