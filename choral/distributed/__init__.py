"""Tensor parallelism's transport and sharding: which rank holds which heads and MLP columns
(shard.py), the collectives between ranks (group.py, shm_all_reduce.py) and the worker
processes (workers.py). The step path that uses them lives in choral/engine/ (tp_runner.py on
rank 0, tp_worker.py in each worker); docs/scale-out.md describes the design."""
