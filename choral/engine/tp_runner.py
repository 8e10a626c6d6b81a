"""Rank 0 of a tensor-parallel group: the engine's model runner when ``tensor_parallel_size`` > 1.

Everything above the runner is unchanged: the scheduler, the KV bookkeeping (block pool,
KvCache) and the sampler run once, here. Each call that touches tensors is first broadcast to
the workers as plain data (a step's chunks: token ids, start, block table, positions; block
copies; the conversations' K/V reads, writes and moves), then run on this rank's own shard. Inside
the forward each layer all-reduces twice (after o_proj, after down): that is where the ranks
meet. Only rank 0 computes logits (the lm_head is replicated), so sampling happens once.

Failure: before each command the workers' processes are checked; a collective that fails
(gloo reports a peer's closed connection at once, a hung peer after the timeout) turns into
TensorParallelError naming the rank and its exit. The runner is then broken for good: the
workers are stopped and every later call raises the same error, so nothing hangs and no
process is left behind.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pickle
import time
from typing import Any

import torch
import torch.distributed as dist

from choral.config import EngineConfig
from choral.distributed.group import CommGroup
from choral.distributed.shard import plan_shards
from choral.distributed.shm_all_reduce import ShmAllReduce, create_segment
from choral.distributed.workers import WorkerProcesses
from choral.engine.model_runner import Chunk, ModelRunner
from choral.engine.tp_worker import WireChunk, WorkerInit, select_heads
from choral.errors import ConfigError, TensorParallelError
from choral.kv.block_pool import KvCacheSize
from choral.loader.load import LoadedModel

logger = logging.getLogger(__name__)

# How long a collective may wait for a peer (a live but stuck one; a dead one fails at once), and
# how long the workers may take to load their shards. CHORAL_TP_TIMEOUT_S overrides both.
DEFAULT_TIMEOUT_S = 300.0
_POLL_S = 0.02


def _timeout_s() -> float:
    value = os.environ.get("CHORAL_TP_TIMEOUT_S")
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"CHORAL_TP_TIMEOUT_S: {value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ConfigError(f"CHORAL_TP_TIMEOUT_S: must be positive, got {value!r}")
    return seconds


ALL_REDUCES = ("gloo", "shm")


def _all_reduce_kind(device: str) -> str:
    """CHORAL_TP_ALLREDUCE: ``gloo`` (default) or ``shm`` (CPU only; benchmarks/bench_tp.py)."""
    kind = os.environ.get("CHORAL_TP_ALLREDUCE", "gloo")
    if kind not in ALL_REDUCES:
        raise ConfigError(f"CHORAL_TP_ALLREDUCE: {kind!r} is not one of {', '.join(ALL_REDUCES)}")
    if kind == "shm" and device != "cpu":
        raise ConfigError("CHORAL_TP_ALLREDUCE=shm: the shared-memory all-reduce is for CPU ranks; on CUDA the "
                          "ranks all-reduce with NCCL (unset it)")
    return kind


def _set(store: dist.Store, key: str, value: bytes) -> None:
    store.set(key, value)  # type: ignore[arg-type]  # the stubs say str; bytes are stored as they are


class TensorParallelLaunch:
    """Ranks 1 .. N-1 started (each loads its own shard of the weights); ``finish`` waits for
    them and makes rank 0's runner."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel, kv_size: KvCacheSize, num_threads: int):
        world = config.tensor_parallel_size
        shm_kind = _all_reduce_kind(config.device) == "shm"
        if config.device != "cpu" and torch.cuda.device_count() < world:  # pragma: no cover - GPU hosts
            raise ConfigError(f"tensor_parallel_size: {world} ranks need {world} GPUs, this host has "
                              f"{torch.cuda.device_count()}")
        self.config = config
        self.timeout_s = _timeout_s()
        # Port 0: the OS picks a free one; the workers learn it from their command line.
        self.store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=self.timeout_s),
                                   wait_for_workers=False)
        # The shared-memory slots hold the largest all-reduce of a step: [tokens, hidden].
        self.shm: tuple[str, int] | None = None
        if shm_kind:
            slot = config.max_num_batched_tokens * loaded.spec.hidden_size * loaded.model.dtype.itemsize
            self.shm = (create_segment(world, slot), slot)
        try:
            init = WorkerInit(config, kv_size, num_threads, self.timeout_s, self.shm)
            _set(self.store, "init", pickle.dumps(init))
            self.workers = WorkerProcesses("choral.engine.tp_worker", "127.0.0.1", self.store.port, world)
        except BaseException:
            self._unlink()
            raise

    def finish(self, loaded: LoadedModel, kv_size: KvCacheSize) -> TensorParallelRunner:
        """Wait until each worker has loaded its shard, then join the group."""
        world = self.config.tensor_parallel_size
        deadline = time.monotonic() + self.timeout_s
        waiting = set(range(1, world))
        while waiting:
            for rank in sorted(waiting):
                if self.store.check([f"failed/{rank}"]):
                    raise TensorParallelError(f"tensor-parallel worker rank {rank} failed to start:\n"
                                              f"{self.store.get(f'failed/{rank}').decode()}")
                if self.store.check([f"ready/{rank}"]):
                    waiting.discard(rank)
            exited = self.workers.exited()
            if exited and waiting:
                raise TensorParallelError(f"{exited[0].describe()} while loading its shard")
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel workers {sorted(waiting)} did not load their shards "
                                          f"in {self.timeout_s:.0f} s (CHORAL_TP_TIMEOUT_S)")
            if waiting:
                time.sleep(_POLL_S)
        shm = None
        if self.shm is not None:
            shm = ShmAllReduce(self.shm[0], 0, world, self.shm[1], self.timeout_s, self._check_workers)
            self._unlink()  # every rank has it mapped: the name is no longer needed
        group = CommGroup(self.store, 0, world, loaded.model.device, self.timeout_s, shm)
        return TensorParallelRunner(loaded, kv_size, self.config.attention_backend, group, self.workers)

    def _check_workers(self) -> None:
        """Raised into a shared-memory wait: the rank it waits for is gone (gloo notices by itself)."""
        exited = self.workers.exited()
        if exited:
            raise RuntimeError(exited[0].describe())

    def _unlink(self) -> None:
        if self.shm is not None:
            try:
                os.unlink(self.shm[0])
            except FileNotFoundError:
                pass

    def abort(self) -> None:
        """Stop the workers (rank 0 failed to start)."""
        self._unlink()
        self.workers.close(timeout_s=5.0)


class TensorParallelRunner(ModelRunner):
    """Rank 0's ModelRunner: runs every call on its shard after sending it to the workers."""

    def __init__(self, loaded: LoadedModel, kv_size: KvCacheSize, attention_backend: str, group: CommGroup,
                 workers: WorkerProcesses):
        # The runner's caches and attention are built for this rank's heads (the shard's spec).
        super().__init__(dataclasses.replace(loaded, spec=loaded.model.spec), kv_size, attention_backend)
        self.spec = loaded.spec  # the whole model's, for everyone above the runner
        self.world = group.world
        self.shards = plan_shards(loaded.spec, self.world)
        self._group = group
        self._workers = workers
        self._failure: TensorParallelError | None = None
        self.model.all_reduce = self._all_reduce

    @property
    def worker_pids(self) -> list[int]:
        return self._workers.pids

    # ---- the step ------------------------------------------------------------------------------
    def execute_with_hidden(self, chunks: list[Chunk]) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        if any(c.lora is not None for c in chunks):
            raise ConfigError("enable_lora: LoRA adapters are not supported under tensor parallelism")
        wires: list[WireChunk] = [(c.token_ids, c.start, c.block_table, c.positions, c.embeds) for c in chunks]
        self._send(("step", wires, []))
        return self._guard(lambda: super(TensorParallelRunner, self).execute_with_hidden(chunks))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        self._send(("copy", pairs))
        super().copy_blocks(pairs)

    # ---- direct K/V access: gathered from / scattered to every rank's KV heads ------------------
    def read_tokens(self, block_table: list[int], count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self._send(("read", block_table, count))

        def gather() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            parts = [super(TensorParallelRunner, self).read_tokens(block_table, count)]
            parts += [self._group.recv_object(rank) for rank in range(1, self.world)]
            # Each global KV head from the first rank that holds it (replicated heads are equal).
            owner: dict[int, tuple[int, int]] = {}
            for shard in self.shards:
                for local, head in enumerate(shard.kv_heads):
                    owner.setdefault(head, (shard.rank, local))
            order = [owner[h] for h in range(self.spec.num_kv_heads)]

            def assemble(which: int) -> list[torch.Tensor]:
                layers = []
                for layer in range(len(parts[0][which])):
                    heads = [parts[r][which][layer][:, i].to(self.device) for r, i in order]
                    layers.append(torch.stack(heads, dim=1))  # [count, KVH, D]
                return layers

            return assemble(0), assemble(1)

        return self._guard(gather)

    def write_tokens(self, block_table: list[int], start: int, keys: list[torch.Tensor],
                     values: list[torch.Tensor]) -> None:
        keys = [k.cpu() for k in keys]
        values = [v.cpu() for v in values]
        self._send(("write", block_table, start, keys, values))
        shard = self.shards[0]
        super().write_tokens(block_table, start, select_heads(keys, shard), select_heads(values, shard))

    def move_tokens(self, block_table: list[int], src_start: int, dst_start: int, count: int) -> None:
        if count <= 0:
            return
        self._send(("move", block_table, src_start, dst_start, count))
        self._guard(lambda: super(TensorParallelRunner, self).move_tokens(block_table, src_start, dst_start, count))

    # ---- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Tell the workers to stop and wait for them (killed after a grace period). Idempotent."""
        if self._failure is None:
            self._failure = TensorParallelError("the tensor-parallel engine was closed")
            try:
                self._group.broadcast_object(("stop",))
            except RuntimeError:  # a worker is already gone: closing its stdin ends the others
                pass
        self._workers.close()

    # ---- transport and failure -----------------------------------------------------------------
    def _send(self, command: tuple[Any, ...]) -> None:
        if self._failure is not None:
            raise self._failure
        exited = self._workers.exited()
        if exited:
            self._fail(exited[0].describe(), None)
        self._guard(lambda: self._group.broadcast_object(command))

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        self._guard(lambda: self._group.all_reduce(tensor))

    def _guard(self, fn: Any) -> Any:
        """Run ``fn`` (a collective, or this rank's part of a command already sent). Any error
        breaks the group: the workers may be inside a collective this rank will never join, and a
        later command would pair up with it."""
        try:
            return fn()
        except TensorParallelError:
            raise
        except BaseException as e:
            if self._failure is not None:
                raise
            # gloo says "connection closed by peer" at once; the process may take a moment to be reaped.
            deadline = time.monotonic() + 2.0
            while isinstance(e, RuntimeError) and not self._workers.exited() and time.monotonic() < deadline:
                time.sleep(_POLL_S)
            exited = self._workers.exited()
            first_line = str(e).splitlines()[0][:200] if str(e) else ""
            what = exited[0].describe() if exited else f"rank 0 failed: {type(e).__name__}: {first_line}"
            if not isinstance(e, Exception):  # KeyboardInterrupt and the like stay what they are
                self._mark_failed(what)
                raise
            self._fail(what, e)

    def _fail(self, what: str, cause: BaseException | None) -> None:
        failure = self._mark_failed(what)
        raise failure from cause

    def _mark_failed(self, what: str) -> TensorParallelError:
        self._failure = TensorParallelError(f"{what}; the tensor-parallel engine cannot run any more steps, "
                                            "start a new one")
        logger.error("%s", self._failure)
        self._workers.close(timeout_s=2.0)
        return self._failure
