"""A tensor-parallel worker: rank 1 .. N-1, run as ``python -m choral.engine.tp_worker HOST PORT RANK``.

It loads its shard of the weights, builds its own model runner (its K/V cache holds its KV heads
for the same block ids as rank 0's), then runs what rank 0 broadcasts until told to stop:
every step's chunks (the same forward as rank 0's, minus the logits: only rank 0 samples),
block copies, and the conversations' K/V reads, writes and moves. It keeps no bookkeeping of
its own: block tables arrive with each command.

It exits when rank 0 says stop, when its stdin reaches end of file (rank 0 closed it or died),
or when a collective fails (a peer died): no worker outlives its engine.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pickle
import signal
import sys
import threading
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from choral.config import EngineConfig
from choral.distributed.group import CommGroup
from choral.distributed.shard import TensorShard, plan_shards
from choral.distributed.shm_all_reduce import ShmAllReduce
from choral.engine.model_runner import Chunk, ModelRunner
from choral.kv.block_pool import KvCacheSize
from choral.loader.load import load_model

logger = logging.getLogger(__name__)

# (token ids, start, block table, rope positions, soft-prompt rows): a Chunk as plain data.
WireChunk = tuple[list[int], int, list[int], list[int] | None, tuple[list[int], torch.Tensor, list[int]] | None]


@dataclass(frozen=True)
class WorkerInit:
    """What every worker needs to build its rank (rank 0 puts it in the store, pickled)."""

    config: EngineConfig
    kv_size: KvCacheSize  # every rank's pool has the same blocks (rank 0 keeps the books)
    num_threads: int
    timeout_s: float
    shm: tuple[str, int] | None  # (path, slot bytes) of the shared-memory all-reduce, or None: gloo


def rank_device(device: str, rank: int) -> torch.device:
    """Rank ``rank``'s device: the CPU, or GPU ``rank``."""
    return torch.device("cpu") if device == "cpu" else torch.device("cuda", rank)


def to_chunk(wire: WireChunk) -> Chunk:
    """A worker's chunk: the same tokens and slots as rank 0's, no logits or hidden rows."""
    token_ids, start, table, positions, embeds = wire
    return Chunk(token_ids, start, table, positions, logits="none", embeds=embeds)


def select_heads(tensors: list[torch.Tensor], shard: TensorShard) -> list[torch.Tensor]:
    """Per layer [count, KVH, D] of the whole model -> this rank's KV heads."""
    index = torch.tensor(shard.kv_heads, dtype=torch.long)
    return [t.index_select(1, index) for t in tensors]


def serve(group: CommGroup, runner: ModelRunner, shard: TensorShard) -> None:
    """Run rank 0's commands until ``stop``."""
    while True:
        command = group.broadcast_object()
        kind = command[0]
        if kind == "step":
            _, wires, copies = command
            runner.copy_blocks(copies)
            runner.execute([to_chunk(w) for w in wires])
        elif kind == "copy":
            runner.copy_blocks(command[1])
        elif kind == "read":
            keys, values = runner.read_tokens(command[1], command[2])
            group.send_object(([k.cpu() for k in keys], [v.cpu() for v in values]), 0)
        elif kind == "write":
            _, table, start, keys, values = command
            runner.write_tokens(table, start, select_heads(keys, shard), select_heads(values, shard))
        elif kind == "move":
            runner.move_tokens(*command[1:])
        elif kind == "stop":
            return
        else:
            raise RuntimeError(f"tensor-parallel worker: unknown command {kind!r}")


def _exit_when_orphaned() -> None:
    """Rank 0 holds our stdin's other end: end of file means it closed it or died."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def main(argv: list[str]) -> int:
    host, port, rank = argv[0], int(argv[1]), int(argv[2])
    # Ctrl-C in a terminal reaches the whole process group: rank 0 decides (a server drains its
    # requests first), and the worker goes when rank 0 says stop or its stdin closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, name="choral-tp-orphan-watch", daemon=True).start()
    store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=300))
    init: WorkerInit = pickle.loads(store.get("init"))
    config = init.config
    world = config.tensor_parallel_size
    try:
        torch.set_num_threads(init.num_threads)
        device = rank_device(config.device, rank)
        if device.type == "cuda":  # pragma: no cover - needs a multi-GPU host
            torch.cuda.set_device(device)
        loaded = load_model(config.model, config.dtype, str(device), config.max_model_len, config.load_weights,
                            None, tp_rank=rank, tp_size=world, with_tokenizer=False)
        shard = plan_shards(loaded.spec, world)[rank]
        runner = ModelRunner(dataclasses.replace(loaded, spec=loaded.model.spec), init.kv_size,
                             config.attention_backend)
        shm = ShmAllReduce(init.shm[0], rank, world, init.shm[1], init.timeout_s) if init.shm else None
    except BaseException:
        store.set(f"failed/{rank}", traceback.format_exc())
        return 1
    store.set(f"ready/{rank}", "1")
    group = CommGroup(store, rank, world, device, init.timeout_s, shm)
    loaded.model.all_reduce = group.all_reduce
    try:
        serve(group, runner, shard)
    except RuntimeError as e:  # a collective failed: rank 0 (or a peer) is gone
        print(f"choral tensor-parallel worker rank {rank}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except BaseException:  # a bug: say where, then go (rank 0 sees the closed connection)
        traceback.print_exc()
        code = 1
    # No interpreter teardown: the stdin watcher may call os._exit at the same moment, and the
    # process group's destructors would wait on peers that are already gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
