"""LoRA adapters per request: PEFT loading (adapter.py), the registry by name (registry.py), the
device slots (slots.py) and the batched per-row update in the forward (apply.py). docs/lora.md."""
