"""A real uvicorn server on a tiny chat model, in a thread, for the hostile-input tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from choral.executor import Executor, ExecutorConfig
from choral.server.app import create_app
from choral.server.limits import ServerLimits


@contextmanager
def running_server(model_dir: Path, limits: ServerLimits | None = None, config: ExecutorConfig | None = None,
                   **executor_options: Any) -> Iterator[tuple[str, Executor]]:
    """(base URL, executor) of a server on ``model_dir`` for the block's duration."""
    import uvicorn

    options: dict[str, Any] = dict(dtype="float32", block_size=4, kv_cache_tokens=2048, max_model_len=256)
    options.update(executor_options)
    ex = Executor(str(model_dir), config or ExecutorConfig(max_queue_size=64), **options)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = uvicorn.Config(create_app(ex, "tiny", limits=limits), host="127.0.0.1", port=port,
                            log_level="error", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", ex
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        ex.shutdown(wait=False)
