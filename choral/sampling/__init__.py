"""Sampling: parameters, the batched sampler, logits processors, grammars and beam search."""

from choral.sampling.params import SamplingParams
from choral.sampling.processors import LogitsProcessorRegistry
from choral.sampling.sampler import Row, Sampler, SampleResult, SamplingRow

__all__ = ["LogitsProcessorRegistry", "Row", "SampleResult", "Sampler", "SamplingParams", "SamplingRow"]
