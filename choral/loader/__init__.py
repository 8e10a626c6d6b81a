"""Model loading: resolve a name or path, read weights and tokenizer (GGUF or HF directory)."""

from choral.loader.load import LoadedModel, load_model
from choral.loader.resolve import resolve_model_path

__all__ = ["LoadedModel", "load_model", "resolve_model_path"]
