"""Quantized weights kept packed on the CPU: GGUF blocks repacked at load (``repack``), the
typed kernel wrappers (``kernels``) and the projection/embedding classes that use them (``linear``)."""
