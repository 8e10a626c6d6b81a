"""``LLM``: the offline, vLLM-shaped entry point. ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from choral.config import DEFAULT_MODEL, EngineConfig
from choral.engine.llm_engine import LLMEngine
from choral.engine.outputs import RequestOutput
from choral.engine.prompts import is_single_prompt, to_token_ids
from choral.errors import InvalidRequestError
from choral.sampling.params import SamplingParams
from choral.tokenizer import Tokenizer


class LLM:
    """Load a model and generate from batches of prompts.

    Args:
        model: a bundled model name, a ``.gguf`` file or an HF model directory.
        dtype, device and any other :class:`~choral.config.EngineConfig` field as keywords;
        an unknown keyword is an error.
    """

    def __init__(self, model: str = DEFAULT_MODEL, **options: Any):
        self.config = EngineConfig.from_kwargs(model=model, **options)
        self.engine = LLMEngine(self.config)
        self._request_counter = 0

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list. A prompt is text, a list of token ids, or a list of
        chat messages (``{"role", "content"}`` dicts, rendered with the model's chat template).

        Returns one :class:`RequestOutput` per prompt, in order. Every prompt is validated before
        any work starts: a bad one raises and nothing runs.
        """
        items = [prompts] if is_single_prompt(prompts) else list(prompts)
        if not items:
            return []
        params = self._params_per_prompt(sampling_params, len(items))
        encoded = [to_token_ids(p, self.tokenizer) for p in items]
        request_ids = [str(self._request_counter + i) for i in range(len(items))]
        seqs = [self.engine.new_sequence(ids, sp, rid)
                for (_, ids), sp, rid in zip(encoded, params, request_ids, strict=True)]
        self._request_counter += len(items)
        outputs: dict[int, RequestOutput] = {}
        bar = _progress(len(seqs)) if use_tqdm else None
        started = time.perf_counter()
        generated = 0

        def on_finish(seq: Any) -> None:
            nonlocal generated
            index = seqs.index(seq)
            outputs[index] = self.engine.to_output(seq, request_ids[index], encoded[index][0])
            generated += seq.num_output_tokens
            if bar is not None:
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{generated / elapsed:.1f} tok/s")
                bar.update(1)

        try:
            self.engine.run(seqs, on_finish)
        finally:
            if bar is not None:
                bar.close()
        return [outputs[i] for i in range(len(seqs))]

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies for one conversation (a list of messages) or a list of them."""
        if messages and all(isinstance(m, dict) for m in messages):
            return self.generate([messages], sampling_params, use_tqdm)
        return self.generate(list(messages), sampling_params, use_tqdm)

    def _params_per_prompt(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count or not all(isinstance(p, SamplingParams) for p in params):
            raise InvalidRequestError(
                f"sampling_params: give one SamplingParams or a list of {count}, got {len(params)} items"
            )
        return params

    def register_logits_processor(self, name: str, fn: Any, batched: bool = False) -> None:
        """Register a logits processor that requests pick by name (``SamplingParams.logits_processors``):
        ``fn(request_id, logits[V], token_ids) -> logits``, or with ``batched=True``
        ``fn(request_ids, logits[R, V], token_ids_per_row) -> logits``."""
        self.engine.register_logits_processor(name, fn, batched)


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")
