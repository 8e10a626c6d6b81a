"""Native CPU kernels, compiled from C on first use (``build.py``) and called only through their
typed wrappers (``paged_attention.py``, ``small_gemm.py``, ``rms_norm.py``, ``rope_kv.py``,
``silu_mul.py``), which check every argument before a pointer reaches C.

They need only a C compiler (gcc or cc) and libgomp; without one, choral falls back to its
pure-torch paths and says so in one log line.
"""
