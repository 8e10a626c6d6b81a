# vLLM's offline chat example, with `from vllm import` changed to `from choral import` and the
# model name changed to the bundled model (choral never downloads).
from choral import LLM, SamplingParams


def print_outputs(outputs):
    print("\nGenerated Outputs:\n" + "-" * 80)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt: {prompt!r}\n")
        print(f"Generated text: {generated_text!r}")
        print("-" * 80)


def main():
    llm = LLM(model="smollm2-135m-instruct")
    sampling_params = SamplingParams(temperature=0.5, max_tokens=32)

    print("=" * 80)

    # In this script, we demonstrate how to pass input to the chat method:
    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
        {
            "role": "user",
            "content": "Write an essay about the importance of higher education.",
        },
    ]
    outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
    print_outputs(outputs)

    # You can run batch inference with llm.chat API
    conversations = [conversation for _ in range(4)]

    # We turn on tqdm progress bar to verify it's indeed running batch inference
    outputs = llm.chat(messages=conversations, sampling_params=sampling_params, use_tqdm=True)
    print_outputs(outputs)

    # Logprobs of the answer: one dict[int, Logprob] per generated token.
    outputs = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=8, logprobs=2))
    for token_id, logprobs in zip(outputs[0].outputs[0].token_ids, outputs[0].outputs[0].logprobs):
        chosen = logprobs[token_id]
        print(f"{chosen.decoded_token!r}: logprob {chosen.logprob:.3f}, rank {chosen.rank}")


if __name__ == "__main__":
    main()
