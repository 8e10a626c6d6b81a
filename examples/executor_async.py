"""asyncio: stream one answer while two others are generated concurrently in the same batches.

Run: .venv/bin/python examples/executor_async.py
"""

import asyncio

from choral import SamplingParams
from choral.executor import AsyncExecutor, Request


async def main() -> None:
    async with AsyncExecutor(model="smollm2-135m-instruct") as ax:
        params = SamplingParams(temperature=0, max_tokens=40)

        async def stream(question: str) -> None:
            async for result in ax.stream(Request([{"role": "user", "content": question}], params)):
                print(result.text, end="", flush=True)
            print()

        others = [ax.generate(Request([{"role": "user", "content": q}], params))
                  for q in ("Name a fruit.", "Name a planet.")]
        _, *done = await asyncio.gather(stream("Tell me about the sea."), *others)
        for completion in done:
            print(completion.text)


if __name__ == "__main__":
    asyncio.run(main())
