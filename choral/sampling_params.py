"""vLLM's module path for sampling parameters, so ``from vllm.sampling_params import ...`` ports by
renaming the package: ``from choral.sampling_params import SamplingParams, StructuredOutputsParams``."""

from choral.sampling.guided import GuidedDecodingParams, StructuredOutputsParams
from choral.sampling.params import SamplingParams

__all__ = ["GuidedDecodingParams", "SamplingParams", "StructuredOutputsParams"]
