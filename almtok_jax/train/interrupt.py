"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (a preempted VM): the signal is noted, the
loop finishes its step, saves a checkpoint and exits. A second Ctrl-C interrupts at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopRequest:
    """The signal that asked the run to stop (``signal.Signals``), or None."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None

    def _note(self, signum: int, frame: object) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """SIGINT and SIGTERM noted in the yielded :class:`StopRequest` while the block runs (main thread only;
    elsewhere signals keep their handlers and the request stays empty)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
