"""Native CPU kernels, compiled from C on first use and loaded with ctypes.

They need only a C compiler (gcc or cc) and libgomp; without one, choral falls back to its
pure-torch attention and says so once.
"""
