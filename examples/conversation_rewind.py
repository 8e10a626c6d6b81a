"""Rewind: generate, step back a few tokens, and take another path from there.

Run: .venv/bin/python examples/conversation_rewind.py
"""

from choral import BatchedExecutor, SamplingParams


def generate(executor: BatchedExecutor, conversation, count: int, params: SamplingParams) -> list[int]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(count):
        token = conversation.sample(params)
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
        conversation.prompt("Once upon a time, in a small village,")
        executor.infer()
        first = generate(executor, conversation, 16, SamplingParams(temperature=0))
        print("greedy:    ", tokenizer.decode(first))
        for attempt in range(3):
            conversation.rewind(11)  # forget the last 11 tokens (their blocks go back)...
            conversation.prompt(first[5])  # ...and re-feed the first of them to get fresh logits
            executor.infer()
            retry = generate(executor, conversation, 9, SamplingParams(temperature=1.0, seed=attempt))
            print(f"retry {attempt}:   ", tokenizer.decode(first[:6] + retry))


if __name__ == "__main__":
    main()
