"""Per-request state inside the executor: a Job owns its sequences (one per ``n``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from choral.engine.sequence import Sequence
from choral.executor.detokenizer import IncrementalDetokenizer
from choral.executor.request import FinishReason, Request, Response, Timing


@dataclass(eq=False)
class ExecSequence(Sequence):
    """A sequence plus what the executor tracks about it."""

    job: Job | None = None
    index: int = 0  # sequence_index within the request
    detok: IncrementalDetokenizer | None = None
    finish: FinishReason = FinishReason.NOT_FINISHED
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of registered full blocks
    sent_tokens: int = 0  # output tokens already handed out in streamed responses
    sent_logprobs: int = 0


@dataclass(eq=False)
class Job:
    """One request: its sequences, timing and where its responses go."""

    request_id: int
    request: Request
    prompt_token_ids: list[int]
    arrival_order: int
    timing: Timing
    deadline: float | None
    collect: bool  # submit()/poll(): keep a final Completion instead of queueing responses
    sequences: list[ExecSequence] = field(default_factory=list)
    responses: deque[Response] = field(default_factory=deque)
    cancelled: bool = False
    done: bool = False
    forked: bool = False  # the n-1 siblings have been forked off sequence 0
    released: bool = False  # nobody will collect it: forget it as soon as it is done
    bad_words: list[tuple[int, ...]] = field(default_factory=list)  # token-id form, for every sample

    def effective_priority(self, now: float, aging_per_s: float) -> float:
        """Priority plus what waiting has earned: a stream of high-priority arrivals cannot
        starve an old low-priority request forever."""
        return self.request.priority + aging_per_s * (now - self.timing.arrival)
