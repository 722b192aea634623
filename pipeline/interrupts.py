"""Ctrl-C that is never lost.

Python delivers Ctrl-C as a KeyboardInterrupt raised wherever the main thread happens to be. When
that is inside a finalizer (`__del__`, a weakref callback: Ray Data's iterators have them), Python
prints "Exception ignored in ..." and carries on, and a run would go on to finish as if nothing
had been pressed. So the handler also records the request, and the orchestrator and the task
loops check the record at every stage boundary and every completed task.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_requested = threading.Event()


def note_interrupt() -> None:
    """Record a Ctrl-C (also for handlers of other libraries that swallow it, e.g. Ray Train's)."""
    _requested.set()


def raise_if_interrupted() -> None:
    if _requested.is_set():
        raise KeyboardInterrupt("stopped by Ctrl-C")


@contextmanager
def ctrl_c_remembered() -> Iterator[None]:
    """Inside: Ctrl-C raises KeyboardInterrupt as usual, and is also remembered until the block ends."""
    _requested.clear()
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def remember(signum, frame):
        note_interrupt()
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()
