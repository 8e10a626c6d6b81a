"""Batched generation on the bundled SmolLM2 model: text, chat messages and token ids in one call.

Run: .venv/bin/python examples/generate.py
"""

from choral import LLM, SamplingParams


def main() -> None:
    llm = LLM("smollm2-135m-instruct", dtype="auto")
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],  # chat messages
        "The three primary colors are",  # plain text
        [1, 9690, 198],  # token ids
    ]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=40, seed=0)
    for out in llm.generate(prompts, params, use_tqdm=True):
        completion = out.outputs[0]
        print(f"--- request {out.request_id} ({len(out.prompt_token_ids)} prompt tokens, "
              f"{len(completion.token_ids)} generated, finish={completion.finish_reason})")
        print(completion.text)


if __name__ == "__main__":
    main()
