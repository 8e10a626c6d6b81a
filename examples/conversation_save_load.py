"""Save and load: save a conversation to a file (or to memory), load it later, continue exactly.

Run: .venv/bin/python examples/conversation_save_load.py
"""

import tempfile
from pathlib import Path

from choral import BatchedExecutor, IncompatibleStateError


def continue_greedy(executor: BatchedExecutor, conversation, count: int) -> list[int]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(count):
        token = conversation.sample()
        out.append(token)
        conversation.prompt(token)
        executor.infer()
    return out


def main() -> None:
    options = dict(dtype="float32", kv_cache_tokens=2048, max_model_len=2048)
    with BatchedExecutor("smollm2-135m-instruct", **options) as executor:
        tokenizer = executor.tokenizer
        assert tokenizer is not None
        conversation = executor.create()
        conversation.prompt(tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about owls."}]))
        executor.infer()
        path = Path(tempfile.mkdtemp()) / "owls.safetensors"
        conversation.save(path)  # tokens, K/V, the pending logits, a model fingerprint, a checksum
        in_memory = conversation.save()  # the same as a State object
        print(f"saved {conversation.token_count} tokens: {path.stat().st_size} bytes on disk, "
              f"{in_memory.size} in memory")
        original = continue_greedy(executor, conversation, 20)
        conversation.close()

        from_file = executor.load(path)
        from_memory = executor.load(in_memory)
        assert continue_greedy(executor, from_file, 20) == original
        assert continue_greedy(executor, from_memory, 20) == original
        print("loaded copies continue exactly:", tokenizer.decode(original))

    with BatchedExecutor("smollm2-135m-instruct", dtype="bfloat16", kv_cache_tokens=2048, max_model_len=2048) as other:
        try:
            other.load(path)
        except IncompatibleStateError as e:
            print("another dtype is refused:", e)


if __name__ == "__main__":
    main()
