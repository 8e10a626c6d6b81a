"""Sampling: parameters and the batched sampler."""

from choral.sampling.params import SamplingParams
from choral.sampling.sampler import Sampler, SampleResult

__all__ = ["SampleResult", "Sampler", "SamplingParams"]
