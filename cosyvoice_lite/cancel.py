"""One cancellation token per request, and the one exception that says work stopped because of it.

The synthesis service creates the token (with the request's deadline and its front door's probe for a vanished
client), the scheduler
checks it between units of work (LLM steps, Euler steps, chunks), and whoever notices first records why.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, Optional

TIMEOUT = "timeout"
CLIENT_GONE = "client_gone"
CANCELLED = "cancelled"
AUDIO_LIMIT = "audio_limit"  # the request reached MAX_AUDIO_SECONDS


class Cancelled(Exception):
    """Work stopped because its request was cancelled; ``reason`` is one of the constants above."""

    def __init__(self, reason: Optional[str] = None):
        self.reason = reason or CANCELLED
        super().__init__(self.reason)


class CancelToken:
    """Set once, with a reason: by ``set``, by the deadline passing, or by ``probe`` (polled from ``poll`` only,
    i.e. by the thread that waits for the audio, since a probe may look at that thread's socket)."""

    def __init__(self, deadline: Optional[float] = None, probe: Optional[Callable[[], bool]] = None,
                 probe_every: float = 0.1):
        self.deadline = deadline           # time.monotonic() value, or None
        self.reason: Optional[str] = None
        self._event = threading.Event()
        self._probe = probe
        self._probe_every = probe_every
        self._probed = 0.0

    def set(self, reason: str = CANCELLED) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        if self._event.is_set():
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.set(TIMEOUT)
            return True
        return False

    def poll(self) -> bool:
        """``is_set``, and also ask the probe (rate-limited) whether the client is gone."""
        if self.is_set():
            return True
        if self._probe is not None:
            now = time.monotonic()
            if now - self._probed >= self._probe_every:
                self._probed = now
                if self._probe():
                    self.set(CLIENT_GONE)
                    return True
        return False


def poll(cancel) -> bool:
    """True when ``cancel`` (a CancelToken, a threading.Event or None) says stop."""
    if cancel is None:
        return False
    return cancel.poll() if hasattr(cancel, "poll") else cancel.is_set()


def reason(cancel) -> str:
    return getattr(cancel, "reason", None) or CANCELLED


DONE = object()  # put on a result queue after the last item


def results(out: queue.SimpleQueue, cancel) -> Iterator:
    """Items from a worker thread's result queue until DONE; an exception on it is raised here, and while the
    queue is empty the waiting thread polls ``cancel`` (it may look at this thread's client) and raises Cancelled."""
    while True:
        try:
            item = out.get(timeout=0.05)
        except queue.Empty:
            if poll(cancel):
                raise Cancelled(reason(cancel)) from None
            continue
        if item is DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
