"""Fork: prompt a shared prefix once, then fork it into several conversations that continue in
one batch each step. The forks share the prefix's KV blocks; only the partly filled last block
is copied when a fork writes into it.

Run: .venv/bin/python examples/conversation_fork.py
"""

from choral import BatchedExecutor, DecodeResult, SamplingParams


def main() -> None:
    options = dict(dtype="float32", kv_cache_tokens=4096, max_model_len=2048)
    with BatchedExecutor("smollm2-135m-instruct", **options) as executor:
        tokenizer = executor.tokenizer
        assert tokenizer is not None
        root = executor.create()
        root.prompt(tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour and a fruit."}]))
        executor.infer()
        pool = executor.engine.pool
        print(f"prefix: {root.token_count} tokens in {pool.num_used_blocks} blocks")

        forks = [root.fork() for _ in range(3)]
        print(f"after 3 forks: {pool.num_used_blocks} blocks (shared)")
        texts: list[list[int]] = [[] for _ in forks]
        for step in range(24):
            for i, conversation in enumerate(forks):
                token = conversation.sample(SamplingParams(temperature=0.8, seed=i))
                texts[i].append(token)
                conversation.prompt(token)
            assert executor.infer() is DecodeResult.OK  # all forks in one batch
            if step == 0:
                print(f"after the first token: {pool.num_used_blocks} blocks (one copied per fork)")
        for i, tokens in enumerate(texts):
            print(f"--- fork {i}: {tokenizer.decode(tokens)!r}")


if __name__ == "__main__":
    main()
