"""Stopping a pure-Python computation that runs too long (a chat template that loops).

A Python thread cannot be killed, but CPython can raise an exception in it at its next bytecode
(``PyThreadState_SetAsyncExc``). A Jinja template compiles to Python bytecode, so a template stuck
in a loop is stopped within a few milliseconds of its deadline. Time spent inside one C call (a
single huge string operation) is not interrupted until that call returns.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DeadlineExceeded(BaseException):
    """Raised inside the thread that ran past its deadline. A BaseException, so that the code it
    interrupts (a template's own ``except Exception``) cannot swallow it."""


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc is not None else None)


def call_with_deadline(fn: Callable[[], T], seconds: float) -> T:
    """``fn()`` in the calling thread, interrupted with DeadlineExceeded after ``seconds``."""
    thread_id = threading.get_ident()
    lock = threading.Lock()
    state = {"active": True, "fired": False}

    def fire() -> None:
        with lock:
            if state["active"]:
                state["fired"] = True
                _raise_in(thread_id, DeadlineExceeded)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    finally:
        timer.cancel()
        with lock:
            state["active"] = False
            if state["fired"]:
                # The timer fired as fn was returning: the exception may still be pending. Clear it
                # here, inside the try, so it cannot surface later in unrelated code.
                _raise_in(thread_id, None)
