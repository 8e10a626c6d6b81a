"""Two chat sessions on one executor, answered together: asyncio.gather puts both sessions'
tokens into the same batches. Each session keeps its history in its conversation's KV cache,
so the second turn only feeds the new message.

Run: .venv/bin/python examples/chat_two_sessions.py
"""

import asyncio

from choral import BatchedExecutor, ChatSession


async def main() -> None:
    options: dict = dict(dtype="float32", kv_cache_tokens=4096, max_model_len=2048)
    with BatchedExecutor("smollm2-135m-instruct", **options) as executor:
        alice = ChatSession(executor.create(), system_prompt="You answer in one short sentence.")
        bob = ChatSession(executor.create())
        for q1, q2 in [("Hi there, how are you?", "How much is 6+6?"),
                       ("What did I just ask you?", "And 7+7?")]:
            a1, a2 = await asyncio.gather(
                alice.aprompt(q1, max_tokens=48),
                bob.aprompt(q2, max_tokens=48, on_text=lambda text: print(text, end="", flush=True)),
            )
            print()
            print(f"User: {q1}\nAI:   {a1}\n")
            print(f"User: {q2}\nAI:   {a2}\n")


if __name__ == "__main__":
    asyncio.run(main())
