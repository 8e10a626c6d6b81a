"""Conversation: one token stream in a BatchedExecutor's shared KV cache.

A conversation is in one of three states, derived from its tokens:

- *requires inference*: it holds prompted tokens not yet in the KV cache; only
  ``BatchedExecutor.infer()`` moves it on (prompt, fork, sample, edits and save raise
  :class:`~choral.errors.RequiresInferenceError`);
- *requires sampling*: its last prompt was computed, so ``logits()`` / ``sample()`` work;
- *idle*: nothing pending and no logits (new, or just edited): prompt it.

A prompt made with ``speculative=`` carries a proposal (speculation.py): after its infer(),
``verify()`` draws the accepted tokens and one more, and every other call but ``close()`` raises
a ConversationStateError until it does.

Every method takes the engine core's lock (the executor's ``_lock`` is the core's), so calls
from several threads, and an Executor sharing the core, are serialized. The tokens, the computed
count and the block table are one :class:`~choral.kv.sequence_state.SequenceState`, edited only
through the core's :class:`~choral.kv.kv_cache.KvCache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch

from choral.conversation.context_shift import ContextShift, plan_shift
from choral.conversation.prompt_embeddings import PromptEmbeddings
from choral.conversation.speculation import ConversationSpeculation
from choral.conversation.state import SavedAdapter, SavedConversation, State, encode_state
from choral.errors import (
    ConversationClosedError,
    ConversationStateError,
    InvalidRequestError,
    KvCacheExhaustedError,
    RequiresInferenceError,
    RequiresPromptError,
    TokenIdOutOfRangeError,
)
from choral.kv.kv_cache import KvUsage
from choral.kv.sequence_state import SequenceState
from choral.lora.adapter import LoraAdapter
from choral.sampling.logits_process import check_token_ids
from choral.sampling.params import SamplingParams
from choral.sampling.sampler import Row
from choral.speculative.config import SpeculativeConfig

if TYPE_CHECKING:
    from choral.conversation.batched_executor import BatchedExecutor

GREEDY = SamplingParams(temperature=0.0)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Conversation:
    """A token stream with its own block table; create with ``BatchedExecutor.create()``."""

    def __init__(self, executor: BatchedExecutor, conversation_id: int, context_shift: ContextShift | None = None):
        self._executor = executor
        self._id = conversation_id
        self.context_shift = context_shift
        self._seq = SequenceState()  # tokens (pending ones included), computed count, block table
        # Per token: this conversation sampled it and was fed it back (output, for penalties).
        self._sampled: list[bool] = []
        self._last_sampled: int | None = None  # the token sample() last returned, until the next prompt or edit
        self._logits: torch.Tensor | None = None  # [rows, V] of the last prompt, once computed
        self._all_logits = False
        self._logit_chunks: list[torch.Tensor] = []
        self._embeddings = PromptEmbeddings()
        self._generator: torch.Generator | None = None
        self._generator_seed: int | None = None
        self._closed = False
        self._lora: LoraAdapter | None = None  # set by BatchedExecutor.create(lora=); forks keep it
        self._spec: ConversationSpeculation | None = None  # the last prompt(speculative=)'s, if any
        self._spec_rows = 0  # rows the pending proposal needs: its prompted token's and one per proposed token

    # ---- state -------------------------------------------------------------------------------
    @property
    def id(self) -> int:
        return self._id

    @property
    def executor(self) -> BatchedExecutor:
        return self._executor

    @property
    def lora(self) -> str | None:
        """The name of the LoRA adapter it runs with (None: the base model)."""
        return self._lora.name if self._lora is not None else None

    @property
    def tokens(self) -> list[int]:
        """Every token of the conversation, pending ones included (a copy)."""
        return list(self._seq.token_ids)

    @property
    def token_count(self) -> int:
        return self._seq.num_tokens

    @property
    def num_pending_tokens(self) -> int:
        return self._seq.num_uncomputed_tokens

    @property
    def requires_inference(self) -> bool:
        return self.num_pending_tokens > 0

    @property
    def requires_sampling(self) -> bool:
        return self._logits is not None and not self.requires_inference

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def block_table(self) -> list[int]:
        """The block ids holding this conversation's K/V (a copy; for tests and tools)."""
        return list(self._seq.block_table)

    def _check_open(self) -> None:
        if self._closed:
            raise ConversationClosedError(f"conversation {self._id} is closed")

    def _check_idle(self, action: str) -> None:
        self._check_open()
        if self.requires_inference:
            raise RequiresInferenceError(
                f"cannot {action} conversation {self._id}: {self.num_pending_tokens} token(s) wait for "
                "BatchedExecutor.infer()"
            )
        if self._spec_rows:
            raise ConversationStateError(f"cannot {action} conversation {self._id}: its speculative proposal "
                                         "waits for verify(params)")

    @property
    def awaits_verification(self) -> bool:
        """A prompt(speculative=...) proposal was computed and waits for :meth:`verify`."""
        return self._spec_rows > 0 and not self.requires_inference

    # ---- prompting ---------------------------------------------------------------------------
    def prompt(self, prompt: str | Sequence[int] | int, all_logits: bool = False,
               add_special_tokens: bool | None = None, embeddings: bool = False,
               speculative: SpeculativeConfig | dict[str, Any] | str | None = None) -> None:
        """Queue text, token ids or one token for the next ``infer()``.

        ``all_logits`` keeps the logits of every prompted token (``logits(offset)`` then reaches
        back ``offset`` tokens). ``embeddings`` keeps the prompt's final hidden states for
        :meth:`embedding`. Text gets the tokenizer's special tokens (BOS) only when the
        conversation is empty, unless ``add_special_tokens`` says otherwise.

        ``speculative`` (``{"method": "ngram" | "draft", "k": ...}``, see docs/speculative.md)
        appends a proposal of up to ``k`` tokens that the same ``infer()`` verifies; then
        :meth:`verify` (not :meth:`sample`) draws the accepted tokens and one more.
        """
        with self._executor._lock:
            self._check_idle("prompt")
            new = self._to_token_ids(prompt, add_special_tokens)
            spec = self._speculation(speculative, all_logits, embeddings)
            fed_back = new == [self._last_sampled]  # before a context shift forgets it
            self._make_room(len(new))
            self._seq.token_ids.extend(new)
            self._sampled.extend([fed_back] * len(new))
            proposal: list[int] = []
            if spec is not None:
                proposal = spec.propose(self._seq.token_ids, self._executor.max_context - self._seq.num_tokens)
                proposal = [t for t in proposal if 0 <= t < self._executor.vocab_size]
                self._seq.token_ids.extend(proposal)
                self._sampled.extend([False] * len(proposal))  # outputs once accepted (verify)
                spec.proposal = proposal
            if self._spec is not None and self._spec is not spec:
                self._spec.close()  # its draft blocks: a new config, or no speculation now
            self._spec = spec
            self._spec_rows = 1 + len(proposal) if proposal else 0
            self._last_sampled = None
            self._logits = None
            self._all_logits = bool(all_logits)
            self._logit_chunks = []
            self._embeddings.start(bool(embeddings))
            self._executor._enqueue(self)

    def _speculation(self, speculative: Any, all_logits: bool, embeddings: bool) -> ConversationSpeculation | None:
        """The conversation's speculation for this prompt (kept across prompts with the same
        config, so its adaptive length carries on), or None; nothing changed on an error."""
        if speculative is None:
            return None
        config = SpeculativeConfig.coerce(speculative)
        if not config.enabled:
            return None
        if all_logits or embeddings:
            raise InvalidRequestError("speculative: a prompt with all_logits or embeddings cannot carry a proposal")
        if self._spec is not None and self._spec.config == config:
            return self._spec
        return ConversationSpeculation(config, self._executor.engine.core.draft)


    def _to_token_ids(self, prompt: str | Sequence[int] | int, add_special_tokens: bool | None) -> list[int]:
        if isinstance(prompt, str):
            tokenizer = self._executor.tokenizer
            if tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: prompt with token ids")
            add = not self._seq.token_ids if add_special_tokens is None else add_special_tokens
            ids = tokenizer.encode(prompt, add_special_tokens=add)
        elif _is_int(prompt):
            ids = [int(prompt)]  # type: ignore[arg-type]
        elif isinstance(prompt, Sequence) and all(_is_int(t) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise InvalidRequestError(
                f"prompt must be a str, a token id or a list of token ids, got {type(prompt).__name__}"
            )
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self._executor.vocab_size
        for t in ids:
            if t < 0 or t >= vocab:
                raise TokenIdOutOfRangeError(f"token id {t} is out of range [0, {vocab})")
        return ids

    def _make_room(self, num_new: int) -> None:
        discard = plan_shift(self.context_shift, self._seq.num_tokens, num_new, self._executor.max_context)
        if discard:
            keep = self.context_shift.keep if self.context_shift else 0
            self._shift(keep, keep + discard)

    # ---- logits and sampling -----------------------------------------------------------------
    def logits(self, offset: int = 0) -> torch.Tensor:
        """Next-token logits [vocab] (fp32) after the last prompted token, or ``offset`` tokens
        before it (needs ``all_logits``). The tensor is live: edits change what ``sample`` sees."""
        with self._executor._lock:
            self._check_idle("read logits of")
            if self._logits is None:
                raise RequiresPromptError(
                    f"conversation {self._id} has no logits: prompt it and run infer() first"
                )
            rows = self._logits.shape[0]
            if not _is_int(offset) or offset < 0 or offset >= rows:
                hint = "" if self._all_logits else " (offsets > 0 need prompt(..., all_logits=True))"
                raise InvalidRequestError(f"logits offset {offset!r} is outside [0, {rows}){hint}")
            return self._logits[rows - 1 - offset]

    def embedding(self, pooling: str = "last", normalize: bool = True) -> torch.Tensor:
        """The last prompt's embedding [hidden] (fp32), for a prompt made with ``embeddings=True``:
        its last token's final hidden state (``last``) or the mean over its tokens (``mean``),
        L2-normalized unless ``normalize`` is False. See prompt_embeddings.py."""
        with self._executor._lock:
            self._check_idle("read the embedding of")
            vector = self._embeddings.pooled(pooling, normalize)
            if vector is None:
                raise RequiresPromptError(f"conversation {self._id} has no embedding: prompt it with "
                                          "embeddings=True and run infer() first")
            return vector

    def sample(self, params: SamplingParams | None = None, offset: int = 0, *,
               num_output_tokens: int | None = None) -> int:
        """Pick the next token from ``logits(offset)`` (greedy by default). Does not prompt it.

        The repetition penalty looks at every token (prompt + output, as vLLM). Presence and
        frequency penalties count the output: the tokens this conversation sampled and was then
        prompted with (``prompt(sample())``), wherever they are in its history; or, with
        ``num_output_tokens``, its last that many tokens (ChatSession: the current answer). A
        loaded state's tokens count as prompt.

        ``min_tokens`` > 0 bans the end tokens on this draw whatever the output (ChatSession
        passes it only until its answer is long enough)."""
        with self._executor._lock:
            row = self.logits(offset)
            params = params or GREEDY
            self._check_sampling(params, num_output_tokens)
            if params.speculative is not None and params.speculative.enabled:
                raise InvalidRequestError("speculative: Conversation.sample draws one token; a conversation "
                                          "speculates with prompt(..., speculative=...) and verify()")
            token = self._draw(row, params, self._seq.num_tokens, num_output_tokens)
            self._last_sampled = token
            return token

    def _check_sampling(self, params: SamplingParams, num_output_tokens: int | None) -> None:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        n = self._seq.num_tokens
        if num_output_tokens is not None and not (_is_int(num_output_tokens) and 0 <= num_output_tokens <= n):
            raise InvalidRequestError(f"num_output_tokens: must be an int in [0, {n}], got {num_output_tokens!r}")
        if params.structured or params.n > 1 or params.num_samples > 1:
            raise InvalidRequestError(
                "Conversation.sample draws one token: structured output, n, best_of and beams run in "
                "the Executor or LLM.generate")
        if params.truncate_prompt_tokens is not None:
            raise InvalidRequestError("truncate_prompt_tokens: a conversation's tokens are fed with prompt(); "
                                      "it applies to the Executor and LLM.generate")

    def _draw(self, row: torch.Tensor, params: SamplingParams, n: int, num_output_tokens: int | None) -> int:
        """One token from ``row`` (logits [V]) after the first ``n`` tokens, as :meth:`sample` draws."""
        engine = self._executor.engine
        engine.logits_processors.check(params.logits_processors)
        bad_words = check_token_ids(params, self._executor.vocab_size, engine.tokenizer)
        generator = None  # set up once the params are known good: a rejected call changes nothing
        if params.seed is not None:
            if self._generator is None or self._generator_seed != params.seed:
                self._generator = torch.Generator(device=row.device)
                self._generator.manual_seed(params.seed)
                self._generator_seed = params.seed
            generator = self._generator
        tokens = self._seq.token_ids[:n]
        if num_output_tokens is not None:
            output = tokens[n - num_output_tokens :]
        else:
            output = [t for t, sampled in zip(tokens, self._sampled, strict=False) if sampled]
        # num_prompt_tokens = all of them: min_tokens counts no output here (see sample()).
        sample_row = Row(params, token_ids=tokens, num_prompt_tokens=n, generator=generator,
                         request_id=str(self.id), bad_words=bad_words, output_token_ids=output)
        result = engine.core.sample(row[None, :], [sample_row])
        return int(result.token_ids[0])

    def verify(self, params: SamplingParams | None = None, *, num_output_tokens: int | None = None) -> list[int]:
        """Draw the tokens of a speculative prompt's verified rows (greedy by default): each
        accepted proposed token, then one more token drawn where the proposal was rejected (or
        after it, when all of it was accepted). Without a proposal (none was found, or the
        prompt did not speculate) it is ``[sample(params)]``. The accepted tokens stay in the conversation,
        computed; the rejected ones and their K/V go; the last token is returned unprompted, as
        :meth:`sample` returns one. The same draws as sampling token by token (exact: the
        proposals are point masses), so greedy output is plain decoding's.

        ``num_output_tokens`` counts the conversation's last tokens as output (as for
        :meth:`sample`), the accepted ones added as they are drawn."""
        with self._executor._lock:
            self._check_open()
            if self.requires_inference:
                raise RequiresInferenceError(f"cannot verify conversation {self._id}: its proposal waits for "
                                             "BatchedExecutor.infer()")
            spec = self._spec
            if not self._spec_rows or spec is None:  # no proposal this time (none found): one token
                return [self.sample(params, num_output_tokens=num_output_tokens)]
            assert self._logits is not None  # computed: infer() left the verification rows
            params = params or GREEDY
            self._check_sampling(params, num_output_tokens)
            if params.speculative is not None:
                raise InvalidRequestError("speculative: verify() draws from the rows prompt(..., speculative=...) "
                                          "asked for; the setting belongs to prompt()")
            proposal = spec.proposal
            rows = self._logits  # [1 + len(proposal), V]: row i follows proposal[:i]
            base = self._seq.num_tokens - len(proposal)  # tokens before the proposal
            drawn: list[int] = []
            for depth in range(len(proposal) + 1):
                outputs = None if num_output_tokens is None else num_output_tokens + depth
                token = self._draw(rows[depth], params, base + depth, outputs)
                drawn.append(token)
                if depth == len(proposal) or token != proposal[depth]:
                    break
                self._sampled[base + depth] = True  # accepted: an output token, fed back
            accepted = len(drawn) - 1
            spec.record(len(proposal), accepted)
            self._executor.engine.core.kv.truncate(self._seq, base + accepted)  # the rejected tokens' K/V
            del self._seq.token_ids[base + accepted:]
            del self._sampled[base + accepted:]
            self._seq.num_computed_tokens = base + accepted
            self._logits = rows[accepted : accepted + 1].clone()  # logits() = what the last token came from
            self._all_logits = False
            self._spec_rows = 0
            spec.proposal = []
            self._last_sampled = drawn[-1]
            return drawn

    @property
    def speculation_stats(self) -> tuple[int, int]:
        """(proposed, accepted) tokens of its speculative prompts so far (under the current config)."""
        spec = self._spec
        return (spec.num_proposed, spec.num_accepted) if spec is not None else (0, 0)

    # ---- structure ---------------------------------------------------------------------------
    def fork(self) -> Conversation:
        """A new conversation with the same tokens, sharing every KV block (copy-on-write)."""
        with self._executor._lock:
            self._check_idle("fork")
            child = self._executor._adopt(self.context_shift)
            self._executor.engine.core.kv.fork(self._seq, child._seq)
            child._seq.token_ids = list(self._seq.token_ids)
            child._sampled = list(self._sampled)
            child._last_sampled = self._last_sampled  # the child holds the same logits
            child._all_logits = self._all_logits
            child._logits = self._logits.clone() if self._logits is not None else None
            child._embeddings = self._embeddings.copy()
            child._lora = self._lora
            if self._generator is not None:
                child._generator = torch.Generator(device=self._generator.device)
                child._generator.set_state(self._generator.get_state())
                child._generator_seed = self._generator_seed
            return child

    def rewind(self, num_tokens: int) -> None:
        """Forget the last ``num_tokens`` tokens (their blocks go back). Prompt again after."""
        with self._executor._lock:
            self._check_idle("rewind")
            n = self._seq.num_tokens
            if not _is_int(num_tokens) or not 0 <= num_tokens <= n:
                raise InvalidRequestError(f"rewind: {num_tokens!r} is outside [0, {n}]")
            self._truncate(n - num_tokens)
            self._logits = None
            self._embeddings.start(False)

    def remove(self, start: int, end: int, recompute: bool = True) -> None:
        """Erase tokens ``start .. end - 1``; later tokens move down to follow.

        ``recompute=True`` (exact): the later tokens' K/V is dropped and they wait for the next
        ``infer()``, which computes them at their new positions, so the result equals a fresh
        conversation with the remaining tokens. ``recompute=False`` (fast, like llama.cpp): their
        cached K/V is moved and the keys re-rotated (see :meth:`shift_left`).
        """
        with self._executor._lock:
            self._check_idle("remove tokens from")
            n = self._seq.num_tokens
            if not (_is_int(start) and _is_int(end) and 0 <= start < end <= n):
                raise InvalidRequestError(f"remove: need 0 <= start < end <= {n}, got start={start!r}, end={end!r}")
            if not recompute:
                self._shift(start, end)
                return
            rest = self._seq.token_ids[end:]
            rest_sampled = self._sampled[end:]
            self._truncate(start)
            self._seq.token_ids.extend(rest)
            self._sampled.extend(rest_sampled)
            self._logits = None
            self._embeddings.start(False)
            self._all_logits = False
            self._logit_chunks = []
            if self.requires_inference:
                self._executor._enqueue(self)

    def shift_left(self, keep: int, discard: int) -> None:
        """Drop ``discard`` tokens after the first ``keep`` and shift the rest down, their cached
        keys re-rotated to the new positions: the context shift that lets generation go past the
        window. Later tokens keep K/V computed with the dropped ones in view (as llama.cpp does);
        use ``remove(..., recompute=True)`` for an exact result. Prompt again after."""
        with self._executor._lock:
            self._check_idle("shift")
            n = self._seq.num_tokens
            if not (_is_int(keep) and _is_int(discard) and keep >= 0 and discard >= 1 and keep + discard <= n):
                raise InvalidRequestError(
                    f"shift_left: need keep >= 0, discard >= 1 and keep + discard <= {n}, "
                    f"got keep={keep!r}, discard={discard!r}"
                )
            self._shift(keep, keep + discard)

    def _truncate(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens (and their K/V); the rest and their blocks go."""
        self._executor.engine.core.kv.truncate(self._seq, num_tokens)
        del self._seq.token_ids[num_tokens:]
        del self._sampled[num_tokens:]
        self._last_sampled = None
        self._seq.num_computed_tokens = num_tokens

    def _shift(self, start: int, end: int) -> None:
        """Erase cache indices ``start .. end - 1`` and move the rest down, keys re-rotated to
        their new positions (llama.cpp's seq_rm + seq_add). Raises KvCacheExhaustedError before
        any change when a shared block in the way cannot be copied."""
        core = self._executor.engine.core
        n = self._seq.num_tokens
        tail = n - end
        copies = core.kv.allocate_slots(self._seq, start, start + tail)
        if copies is None:
            raise _exhausted(core.kv.slots_needed(self._seq, start, start + tail), core.kv.usage())
        core.copy_blocks(copies)
        core.move_tokens(self._seq.block_table, end, start, tail)
        rest = self._seq.token_ids[end:]
        rest_sampled = self._sampled[end:]
        self._truncate(start + tail)
        self._seq.token_ids[start:] = rest
        self._sampled[start:] = rest_sampled
        self._logits = None
        self._embeddings.start(False)

    # ---- save and close ----------------------------------------------------------------------
    @overload
    def save(self, path: None = None, *, key: bytes | None = None) -> State: ...

    @overload
    def save(self, path: str | Path, *, key: bytes | None = None) -> None: ...

    def save(self, path: str | Path | None = None, *, key: bytes | None = None) -> State | None:
        """Save tokens, K/V and pending logits: to ``path``, or return a :class:`State`. With
        ``key`` (bytes), the state is signed (HMAC-SHA256) and ``load(key=...)`` accepts it only
        unchanged: its checksum alone detects damage, not tampering."""
        with self._executor._lock:
            self._check_idle("save")
            keys, values = self._executor.engine.core.read_tokens(self._seq.block_table, self._seq.num_tokens)
            lora = SavedAdapter(self._lora.name, self._lora.digest) if self._lora is not None else None
            saved = SavedConversation(list(self._seq.token_ids), keys, values, self._logits, lora)
            state = encode_state(saved, self._executor.fingerprint, key)
            if path is None:
                return state
            state.save(path)
            return None

    def close(self) -> None:
        """Give the conversation's blocks back (shared ones when the last owner goes). Idempotent."""
        with self._executor._lock:
            if self._closed:
                return
            self._executor._forget(self)
            self._executor.engine.core.kv.free(self._seq)
            if self._spec is not None:
                self._spec.close()  # its draft model blocks
                self._spec = None
            self._spec_rows = 0
            self._seq.token_ids = []
            self._sampled = []
            self._logits = None
            self._closed = True

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ("closed" if self._closed else "requires_inference" if self.requires_inference
                 else "requires_sampling" if self.requires_sampling else "idle")
        return f"Conversation(id={self._id}, tokens={self._seq.num_tokens}, {state})"

    # ---- called by the executor (under its lock) ---------------------------------------------
    def _pending_slice(self, budget: int) -> tuple[int, int]:
        """(start, count) of the next pending tokens to compute, at most ``budget``."""
        return self._seq.num_computed_tokens, min(self.num_pending_tokens, budget)

    def _logits_mode(self, start: int, count: int) -> str:
        if self._all_logits:
            return "all"
        if self._spec_rows and start + count > self._seq.num_tokens - self._spec_rows:
            return "all"  # the chunk holds rows the proposal's verification needs
        return "last" if start + count == self._seq.num_tokens else "none"

    def _computed(self, count: int, logits: torch.Tensor | None, hidden: torch.Tensor | None = None) -> None:
        start = self._seq.num_computed_tokens
        self._seq.num_computed_tokens += count
        self._embeddings.add(hidden, prompt_done=not self.requires_inference)
        if logits is not None and self._spec_rows and not self._all_logits:
            # Keep the verification rows only: the prompted token's and the proposed tokens'.
            logits = logits[max(0, self._seq.num_tokens - self._spec_rows - start):]
        if logits is not None and (self._all_logits or self._spec_rows):
            self._logit_chunks.append(logits)
        if not self.requires_inference:
            # A copy made outside inference mode: an ordinary tensor the caller may edit in place.
            if self._all_logits or self._spec_rows:
                self._logits = torch.cat(self._logit_chunks)
                self._logit_chunks = []
            else:
                self._logits = logits.clone() if logits is not None else None

    def _discard_pending(self) -> None:
        """Drop tokens not yet computed (an aborted chat turn)."""
        if self.requires_inference:
            del self._seq.token_ids[self._seq.num_computed_tokens :]
            del self._sampled[self._seq.num_computed_tokens :]
            self._logit_chunks = []
            self._spec_rows = 0
            if self._spec is not None:
                self._spec.proposal = []
            self._executor._dequeue(self)

    def _load(self, saved: SavedConversation) -> None:
        n = len(saved.tokens)
        if n:
            core = self._executor.engine.core
            copies = core.kv.allocate_slots(self._seq, 0, n)
            if copies is None:
                raise _exhausted(core.kv.slots_needed(self._seq, 0, n), core.kv.usage())
            core.write_tokens(self._seq.block_table, 0, saved.keys, saved.values)
        self._seq.token_ids = list(saved.tokens)
        self._seq.num_computed_tokens = n
        self._sampled = [False] * n
        self._last_sampled = None
        self._logits = saved.logits
        self._all_logits = saved.logits is not None and saved.logits.shape[0] > 1


def _exhausted(need: int, usage: KvUsage) -> KvCacheExhaustedError:
    return KvCacheExhaustedError(
        f"KV cache exhausted: need {need} block(s), {usage.num_free_blocks} free of {usage.num_blocks}; "
        "close a conversation and retry")
