"""Speculative decoding: proposers guess tokens, the target verifies them in the batched step."""

from choral.speculative.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
