"""A conversation's speculative decoding: propose with prompt(), verify in infer(), draw with verify().

``Conversation.prompt(token, speculative={"method": "ngram", "k": 4})`` appends, after the
prompted tokens, up to ``k`` proposed tokens (n-gram lookup over the conversation's tokens, or
the engine's draft model) and asks the next ``infer()`` for the logits of the prompted token and
of every proposed one, in the same batch as the other conversations' tokens.
``Conversation.verify(params)`` then draws depth by depth exactly as the executor does
(choral/executor/step_runner.py): row i gives the token after ``proposal[:i]``, drawn by the
normal sampler with the conversation's history; it goes on while the drawn token equals the
proposal. The accepted tokens stay in the conversation (their K/V are already computed), the
rejected ones and their K/V go, and the last drawn token is returned unprompted, as ``sample()``
returns one. The proposals are point masses, so this is exact rejection sampling: the tokens
follow the target's distribution, and greedy tokens are plain decoding's.

The proposal length adapts per conversation as in the executor (``adaptive``); the executor's
cost gate has no counterpart here (a conversation batch is the caller's to size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from choral.errors import InvalidRequestError
from choral.speculative.adaptive import AdaptiveLength
from choral.speculative.config import SpeculativeConfig
from choral.speculative.ngram import NgramProposer


class ConversationSpeculation:
    """Config, adaptive length and (with a draft model) the draft proposer of one conversation,
    and the proposal waiting for ``verify()``."""

    def __init__(self, config: SpeculativeConfig, draft: Any):
        if config.method == "draft" and draft is None:
            raise InvalidRequestError("speculative: method 'draft' needs a draft model loaded with the engine "
                                      "(EngineConfig.draft_model)")
        if config.model is not None and (draft is None or config.model != draft.name):
            raise InvalidRequestError(f"speculative.model: {config.model!r} is not this engine's draft model; "
                                      "the draft model is chosen when the engine starts")
        self.config = config
        self.length = AdaptiveLength(config.k, config.adaptive)
        # The draft's own cache of this conversation's tokens (it follows rewinds and edits: a
        # draft sequence keeps only the prefix it shares with the tokens it is given).
        self._draft = draft.proposer(config.p_min) if config.method == "draft" else None
        self.proposal: list[int] = []  # appended after the prompted tokens, until verify()
        self.num_proposed = 0
        self.num_accepted = 0

    def propose(self, token_ids: Sequence[int], room: int) -> list[int]:
        """Up to ``min(k, room)`` tokens to follow ``token_ids`` (the adaptive length may say fewer)."""
        k = min(self.length.limit(), room)
        if k <= 0:
            return []
        if self._draft is not None:
            proposal: list[int] = self._draft.propose(token_ids, k)
        else:
            # A fresh index each time: a conversation's tokens may be rewound or edited, where
            # the executor's incremental index assumes they only grow.
            proposal = NgramProposer(self.config.ngram_min, self.config.ngram_max).propose(token_ids, k)
        return proposal

    def record(self, proposed: int, accepted: int) -> None:
        self.length.record(proposed, accepted)
        self.num_proposed += proposed
        self.num_accepted += accepted

    def close(self) -> None:
        """Give the draft model's blocks back (the conversation closed or stopped speculating)."""
        if self._draft is not None:
            self._draft.close()
            self._draft = None
