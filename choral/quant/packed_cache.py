"""Repacked GGUF weights kept on disk, so a warm load maps them instead of repacking.

Repacking the bundled model's 211 quantized tensors into the kernel's layout takes ~1 s of numpy
per load (most of a warm start). The result depends only on the file's bytes and on the layout,
so the first load writes each tensor's packed rows as an ``.npy`` file under
``$CHORAL_CACHE_DIR/packed/<key>/`` (default ``~/.cache/choral``) and later loads map them
copy-on-write (``np.load(mmap_mode="c")``: no read until a page is touched, no copy until one is
written). ``<key>`` hashes the GGUF's metadata digest, its size and modification time, and
``LAYOUT_VERSION``; bump that whenever ``repack.py``'s output changes.

The cache is an optimisation only: a directory that cannot be written, a file that is missing,
truncated or of the wrong shape is passed over (the tensor is repacked), never an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from choral.quant.repack import BLOCK_BYTES, PackedRows

logger = logging.getLogger(__name__)

LAYOUT_VERSION = 1


class PackedCache:
    """The packed tensors of one GGUF file: ``get`` what an earlier load stored, ``put`` the rest."""

    def __init__(self, directory: Path):
        self.directory = directory

    @classmethod
    def for_file(cls, path: Path, kv_digest: str) -> PackedCache:
        from choral.kernels.build import cache_dir  # the kernels' cache root (env var, fallbacks)

        st = path.stat()
        key = hashlib.sha256(f"{kv_digest}:{st.st_size}:{st.st_mtime_ns}:{LAYOUT_VERSION}".encode()).hexdigest()
        return cls(cache_dir().parent / "packed" / key[:16])

    def _file(self, name: str) -> Path:
        return self.directory / (hashlib.sha256(name.encode()).hexdigest()[:24] + ".npy")

    def get(self, name: str, kind: int, rows: int, cols: int, source: str) -> PackedRows | None:
        """Tensor ``name`` as stored by an earlier load, or None (not there, or not what it should be)."""
        file = self._file(name)
        try:
            data = np.load(file, mmap_mode="c")
        except (OSError, ValueError):
            return None
        if data.dtype != np.uint8 or data.shape != (rows, cols // 32 * BLOCK_BYTES[kind]):
            logger.debug("packed cache: %s does not match %s; repacking", file, name)
            return None
        return PackedRows(kind, data, rows, cols, source)

    def put(self, name: str, packed: PackedRows) -> None:
        """Store ``packed`` for later loads (written to a temporary file, then renamed into place)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.save(fh, np.ascontiguousarray(packed.data))
                os.replace(tmp, self._file(name))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:  # a read-only or full disk: loads just repack
            logger.debug("packed cache: cannot store %s in %s (%s)", name, self.directory, e)
