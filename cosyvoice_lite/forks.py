"""Per-process state, made again after a fork.

gunicorn loads the model in its master and forks the workers: threads, thread pools, locks held by another thread
and ONNX sessions do not survive a fork. Whatever must exist once per process (the scheduler's thread, a serial
executor, the warm-up, an ONNX session) is a ``PerProcess``: made on first use in each process.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")
_LOCK = threading.RLock()  # guards the first use in a process (re-entrant: a make() may use another)


def _fresh_lock() -> None:
    global _LOCK
    _LOCK = threading.RLock()  # a lock inherited across a fork may be held by a thread that does not exist there


os.register_at_fork(after_in_child=_fresh_lock)


class PerProcess(Generic[T]):
    def __init__(self, make: Callable[[], T]):
        self._make = make
        self._pid: int | None = None
        self._value: T | None = None

    def get(self) -> T:
        """The value of this process, made by ``make()`` on the first call in it."""
        if self._pid != os.getpid():
            with _LOCK:
                if self._pid != os.getpid():
                    self._value = self._make()
                    self._pid = os.getpid()
        return self._value

    def made(self) -> bool:
        """Whether this process has made its value."""
        return self._pid == os.getpid()
