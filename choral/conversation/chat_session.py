"""ChatSession: a chat (node-llama-cpp's LlamaChatSession) on top of one Conversation.

The history lives in the conversation's KV cache. Each turn renders the whole history with the
model's chat template, keeps the longest prefix the conversation already holds (rewinding past
anything that differs, e.g. an answer that re-tokenizes differently) and feeds only the rest.
Sessions on one executor prompted together with ``asyncio.gather`` share every batch: each
waits in ``BatchedExecutor.wait_for_logits``, which runs one ``infer()`` for all of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from choral.conversation.batched_executor import CancelToken, DecodeResult
from choral.conversation.conversation import Conversation
from choral.errors import InvalidRequestError, KvCacheExhaustedError, PromptTooLongError, RequiresInferenceError
from choral.finish import Finisher, FinishReason, StopConditions
from choral.sampling.params import SamplingParams
from choral.tokenizer import Tokenizer

DEFAULT_CHAT_PARAMS = SamplingParams(temperature=0.0)


@dataclass
class ChatResponse:
    """The last turn's answer: its text, its tokens (without an end token that ended it), why it
    ended, and the end id, stop id or stop string that ended it (vLLM's ``stop_reason``)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NOT_FINISHED
    stop_reason: int | str | None = None


class _Turn:
    """One answer being generated: sampling, then the Finisher's stop checks and text."""

    def __init__(self, session: ChatSession, max_tokens: int, params: SamplingParams,
                 on_text: Callable[[str], None] | None, cancel: CancelToken | None):
        self.session = session
        self.params = params
        self.on_text = on_text
        self.cancel = cancel
        self.response = ChatResponse()
        conversation = session.conversation
        # The last sampled token is never fed, so the answer may end once the conversation's KV
        # holds max_context tokens: max_context + 1 in all. Context shift makes room instead.
        limit = None if conversation.context_shift is not None else conversation.executor.max_context + 1
        conditions = StopConditions.from_params(params, session.eos_token_ids, max_tokens=max_tokens,
                                                max_model_len=limit)
        # An end token is not part of the answer: the chat template closes the turn itself.
        self.finisher = Finisher(conditions, session.tokenizer, num_prompt_tokens=conversation.token_count,
                                 decode_end_tokens=False)
        # Conversation.sample knows no output count: with min_tokens it bans the end tokens on
        # every draw, so the turn hands it min_tokens only until the answer has that many.
        self.free_params = dataclasses.replace(params, min_tokens=0)

    def step(self) -> bool:
        """Sample one token from fresh logits; True when the answer is complete."""
        conversation = self.session.conversation
        if self.cancel is not None and self.cancel.cancelled:
            return self.stop(FinishReason.CANCELLED)
        early = self.finisher.num_tokens < self.params.min_tokens
        # Penalties count the current answer as output (every earlier token is its prompt).
        token = conversation.sample(self.params if early else self.free_params,
                                    num_output_tokens=self.finisher.num_tokens)
        reason = self.finisher.add(token)
        self.emit(self.finisher.delta())
        if reason is not FinishReason.NOT_FINISHED:
            return self.stop(reason)
        if self.cancel is not None and self.cancel.cancelled:  # set during on_text: no extra forward
            return self.stop(FinishReason.CANCELLED)
        conversation.prompt(token)
        return False

    def emit(self, text: str) -> None:
        if text and self.on_text is not None:
            self.on_text(text)

    def stop(self, reason: FinishReason) -> bool:
        self.response.finish_reason = reason
        return True

    def finish(self) -> str:
        r, f = self.response, self.finisher
        rest = f.flush()
        if r.finish_reason is not FinishReason.ERROR:  # an error is on its way up: no more callbacks
            self.emit(rest)
        r.text = f.text
        r.stop_reason = f.stop_reason if f.finished else None
        # A token that ended the answer by id (EOS, a stop id) was never fed: not part of the answer.
        r.token_ids = f.token_ids[:-1] if isinstance(f.stop_reason, int) else list(f.token_ids)
        self.session._end_turn(r)
        return r.text


class ChatSession:
    """A chat over ``conversation`` with the model's chat template.

    Args:
        conversation: an idle conversation of a BatchedExecutor (usually a new one).
        system_prompt: the system message, if any.
    """

    def __init__(self, conversation: Conversation, system_prompt: str | None = None):
        tokenizer = conversation.executor.tokenizer
        if tokenizer is None or not tokenizer.has_chat_template:
            raise InvalidRequestError("ChatSession needs a model with a tokenizer and a chat template")
        self.conversation = conversation
        self.tokenizer: Tokenizer = tokenizer
        self.eos_token_ids = conversation.executor.engine.eos_token_ids
        self.messages: list[dict[str, Any]] = []
        if system_prompt is not None:
            self.messages.append({"role": "system", "content": system_prompt})
        self.last_response: ChatResponse | None = None
        self._pending_user: str | None = None

    # ---- sync and async turns ----------------------------------------------------------------
    def prompt(self, text: str, max_tokens: int = 256, params: SamplingParams | None = None,
               on_text: Callable[[str], None] | None = None, cancel: CancelToken | None = None) -> str:
        """Answer ``text``; returns the answer (greedy unless ``params`` says otherwise).
        ``cancel`` stops after the current token and keeps the partial answer."""
        turn = self._begin(text, max_tokens, params, on_text, cancel)
        executor = self.conversation.executor
        while True:
            while self.conversation.requires_inference:
                if executor.infer() is DecodeResult.NO_KV_SLOT:
                    self.conversation._discard_pending()
                    turn.stop(FinishReason.ERROR)
                    turn.finish()
                    raise KvCacheExhaustedError("KV cache exhausted during the chat turn; close a conversation")
            if turn.step():
                return turn.finish()

    async def aprompt(self, text: str, max_tokens: int = 256, params: SamplingParams | None = None,
                      on_text: Callable[[str], None] | None = None, cancel: CancelToken | None = None) -> str:
        """``prompt`` for asyncio: sessions awaited together are decoded in the same batches.
        Cancelling the task stops after the current token, keeps the partial answer in the
        history (``last_response``) and re-raises CancelledError."""
        turn = self._begin(text, max_tokens, params, on_text, cancel)
        executor = self.conversation.executor
        try:
            while True:
                await executor.wait_for_logits(self.conversation)
                if turn.step():
                    return turn.finish()
        except BaseException as e:
            with executor._lock:  # waits for a forward in flight, then drops what it did not compute
                self.conversation._discard_pending()
            turn.stop(FinishReason.CANCELLED if isinstance(e, asyncio.CancelledError) else FinishReason.ERROR)
            turn.finish()
            raise

    # ---- history -----------------------------------------------------------------------------
    def _begin(self, text: str, max_tokens: int, params: SamplingParams | None,
               on_text: Callable[[str], None] | None, cancel: CancelToken | None) -> _Turn:
        if not isinstance(text, str):
            raise InvalidRequestError(f"chat prompt must be a str, got {type(text).__name__}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequestError(f"max_tokens: must be an int >= 1, got {max_tokens!r}")
        params = params or DEFAULT_CHAT_PARAMS
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params: expected SamplingParams, got {type(params).__name__}")
        if cancel is not None and not isinstance(cancel, CancelToken):
            raise InvalidRequestError(f"cancel: expected a CancelToken or None, got {type(cancel).__name__}")
        if self.conversation.requires_inference:
            raise RequiresInferenceError("the conversation has tokens waiting for infer(); finish that turn first")
        kept, target = self._render(text, max_tokens)
        held = self.conversation.tokens
        common = 0
        while common < min(len(held), len(target) - 1) and held[common] == target[common]:
            common += 1
        if common < len(held):
            self.conversation.rewind(len(held) - common)
        self.conversation.prompt(target[common:])
        self.messages = kept
        self._pending_user = text
        return _Turn(self, max_tokens, params, on_text, cancel)

    def _render(self, text: str, max_tokens: int) -> tuple[list[dict[str, Any]], list[int]]:
        """(the history to keep, token ids of it plus ``text``). When they leave less than ``max_tokens`` (at
        most half the context) for the answer, the oldest exchanges are dropped, the system
        prompt kept (node-llama-cpp's "erase the first response" strategy); the conversation
        then recomputes from the first difference."""
        limit = self.conversation.executor.max_context
        reserve = min(max_tokens, limit // 2)
        user = {"role": "user", "content": text}
        kept = list(self.messages)
        while True:
            target = self.tokenizer.apply_chat_template([*kept, user])
            droppable = [i for i, m in enumerate(kept) if m["role"] != "system"]
            if len(target) + reserve <= limit or not droppable:
                break
            # Drop the oldest user message with the answers that follow it.
            end = next((i for i in droppable[1:] if kept[i]["role"] == "user"), len(kept))
            del kept[droppable[0]:end]
        if len(target) >= limit:
            raise PromptTooLongError(f"the chat prompt has {len(target)} tokens; the context holds {limit}")
        return kept, target

    def _end_turn(self, response: ChatResponse) -> None:
        self.messages.append({"role": "user", "content": self._pending_user})
        self.messages.append({"role": "assistant", "content": response.text})
        self.last_response = response
        self._pending_user = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The messages so far (a copy)."""
        return [dict(m) for m in self.messages]
