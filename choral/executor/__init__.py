"""The executor: a request queue and a background loop running continuous batching."""

from choral.executor.async_executor import AsyncExecutor
from choral.executor.completion import Completion, SequenceOutput
from choral.executor.config import BatchingStrategy, ExecutorConfig, KvPolicy
from choral.executor.executor import Executor
from choral.executor.request import Request, Response, Result, Timing
from choral.executor.stats import AggregateStats, IterationStats
from choral.finish import FinishReason

__all__ = [
    "AggregateStats", "AsyncExecutor", "BatchingStrategy", "Completion", "Executor", "ExecutorConfig",
    "FinishReason", "IterationStats", "KvPolicy", "Request", "Response", "Result", "SequenceOutput", "Timing",
]
