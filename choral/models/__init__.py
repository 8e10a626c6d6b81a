"""Model architectures. Importing this package registers every architecture file."""

from choral.models import gemma3, llama, mistral, qwen2, qwen3  # noqa: F401  (registration)
from choral.models.registry import supported

__all__ = ["supported"]
