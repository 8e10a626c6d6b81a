"""Decoding controls on the bundled SmolLM2: penalties, n samples, beam search, a stop string,
a logits processor and JSON-schema output, all in one engine.

Run: .venv/bin/python examples/decoding_controls.py
"""

import json

import torch

from choral import LLM, SamplingParams

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}}, "required": ["name", "age"]}


def main() -> None:
    llm = LLM("smollm2-135m-instruct", dtype="auto")
    question = [{"role": "user", "content": "Write one sentence about the sea."}]

    def no_digits(request_id: str, logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        logits[digit_ids] = float("-inf")
        return logits

    tok = llm.tokenizer
    assert tok is not None
    digit_ids = [tok.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    llm.register_logits_processor("no_digits", no_digits)

    cases = {
        "penalties": SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5,
                                    max_tokens=40, seed=0),
        "n=3": SamplingParams(temperature=0.9, n=3, max_tokens=24, seed=1),
        "beam 4": SamplingParams(beam_width=4, n=2, max_tokens=24),
        "stop string": SamplingParams(temperature=0, stop=["."], max_tokens=40),
        "no digits": SamplingParams(temperature=0, logits_processors=["no_digits"], max_tokens=30),
    }
    for name, params in cases.items():
        out = llm.generate(question, params)[0]
        for completion in out.outputs:
            print(f"[{name} #{completion.index}] {completion.text!r}")
    person = [{"role": "user", "content": "Invent a person."}]
    out = llm.generate(person, SamplingParams(temperature=0.7, seed=2, max_tokens=60, json_schema=PERSON))[0]
    print("[json]", json.loads(out.outputs[0].text))


if __name__ == "__main__":
    main()
