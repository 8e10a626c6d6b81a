"""When sequences end and what text they produced: one FinishReason, one Finisher."""

from choral.finish.detokenizer import IncrementalDetokenizer
from choral.finish.finisher import Finisher, StopConditions
from choral.finish.reason import FinishReason

__all__ = ["FinishReason", "Finisher", "IncrementalDetokenizer", "StopConditions"]
