"""Conversations over one shared KV cache: BatchedExecutor, Conversation, ChatSession."""

from choral.conversation.batched_executor import BatchedExecutor, CancelToken, DecodeResult
from choral.conversation.chat_session import ChatResponse, ChatSession
from choral.conversation.context_shift import ContextShift
from choral.conversation.conversation import Conversation
from choral.conversation.state import FORMAT_VERSION, State

__all__ = [
    "FORMAT_VERSION",
    "BatchedExecutor",
    "CancelToken",
    "ChatResponse",
    "ChatSession",
    "ContextShift",
    "Conversation",
    "DecodeResult",
    "State",
]
