"""StepCost: what a step costs by its number of tokens, measured, to decide what to verify.

Verifying a proposal adds its tokens to the step. Where a step's cost barely grows with its
tokens (memory-bound decode: fp32 weights, a GPU), that is nearly free; where it grows linearly
(compute-bound: the CPU's integer-dot kernels for quantized weights, large batches), extra tokens
cost as much as the steps they save. So the speculator keeps the measured latency of recent steps
per size bucket (powers of two) and only adds a proposal when the step's expected output tokens
per second go up: ``(decodes + accepted) / cost(tokens + proposed)`` against the step without it.

A size never seen (or not seen for ``STALE_STEPS``) is explored: the proposals go ahead once, and
the step's latency fills the bucket. Load on a shared machine moves every bucket together, and
buckets are re-measured when stale, so the comparison stays between like and like.
"""

from __future__ import annotations

EMA = 0.2  # weight of the newest step in a bucket's averages
STALE_STEPS = 256  # a bucket not measured for this many steps is forgotten (and explored again)


class StepCost:
    """Exponential averages of (tokens, seconds) per bucket of step sizes."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float, int]] = {}  # bit_length -> (tokens, seconds, last step)
        self._steps = 0

    def observe(self, num_tokens: int, seconds: float) -> None:
        """A step of ``num_tokens`` tokens took ``seconds`` (everything: forward, sampling, update)."""
        if num_tokens <= 0:
            return
        self._steps += 1
        key = num_tokens.bit_length()
        tokens, secs, _ = self._buckets.get(key, (float(num_tokens), seconds, 0))
        self._buckets[key] = (tokens + EMA * (num_tokens - tokens), secs + EMA * (seconds - secs), self._steps)
        for key in [k for k, (_, _, last) in self._buckets.items() if self._steps - last > STALE_STEPS]:
            del self._buckets[key]

    def measured(self, num_tokens: int) -> bool:
        """Whether steps of about ``num_tokens`` tokens (its power-of-two bucket) were measured."""
        return num_tokens > 0 and num_tokens.bit_length() in self._buckets

    def estimate(self, num_tokens: int) -> float | None:
        """Seconds a step of ``num_tokens`` tokens is expected to take: piecewise linear through
        the buckets' averages; None beyond the largest measured (unknown: explore)."""
        points = sorted((t, s) for t, s, _ in self._buckets.values())
        if not points or num_tokens > points[-1][0]:
            return None
        if num_tokens <= points[0][0]:
            return points[0][1]
        for (t0, s0), (t1, s1) in zip(points, points[1:], strict=False):
            if num_tokens <= t1:
                return s0 + (s1 - s0) * (num_tokens - t0) / (t1 - t0) if t1 > t0 else s1
        return points[-1][1]
