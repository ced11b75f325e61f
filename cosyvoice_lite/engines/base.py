"""The interface the service talks to: text + speaker -> float32 mono chunks at ``OUTPUT_RATE``, as they come.

Two engines exist: ``CosyVoiceEngine`` (engines/cosyvoice.py, the product) and ``PiperEngine`` (engines/piper.py,
a small English fallback so that a box with no CosyVoice checkpoint still starts and speaks).

``synthesize`` may be called from many threads at once. An engine that batches concurrent requests itself
(CosyVoice's scheduler) says so with ``max_batch``; one that cannot (Piper) runs its requests one after another on
one thread of its own (``SerialExecutor``).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..cancel import DONE, Cancelled, poll, reason, results

OUTPUT_RATE = 24000


class SynthesisError(ValueError):
    """The request cannot be spoken (the message is safe to show to the client)."""


@dataclass(frozen=True)
class Speaker:
    id: str          # the model's own id, e.g. '中文女'
    alias: str       # readable ASCII alias, e.g. 'zh-female'
    language: str    # BCP-47-ish language tag, e.g. 'zh', 'en', 'ja', 'yue', 'ko'
    engine: str      # 'cosyvoice' or 'piper'


@dataclass(frozen=True)
class Plan:
    """What a text will cost, known before any synthesis: the engine's text units (CosyVoice: text tokens; other
    engines: characters), bounds on the audio it can give at speed 1 (seconds), and the engine's prepared input
    (handed back to ``synthesize`` so that the frontend does not run twice)."""
    units: int
    min_audio_s: float = 0.0
    max_audio_s: float = float("inf")
    data: object = None


class SerialExecutor:
    """Runs synthesis generators one after another on one thread of this process (started again after a fork),
    for engines that cannot serve two requests at once; callers wait for their chunks and watch their cancel."""

    def __init__(self, name: str):
        self.name = name
        self._pid = None
        self._lock = threading.Lock()

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():
                self._inbox: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(target=self._loop, name=self.name, daemon=True).start()
                self._pid = os.getpid()

    def run(self, make: Callable[[], Iterator[np.ndarray]], cancel=None) -> Iterator[np.ndarray]:
        self._ensure_thread()
        out: queue.SimpleQueue = queue.SimpleQueue()
        gone = threading.Event()
        self._inbox.put((make, out, cancel, gone))
        try:
            yield from results(out, cancel)
        finally:
            gone.set()  # the worker drops this job at its next chunk

    def _loop(self) -> None:
        while True:
            make, out, cancel, gone = self._inbox.get()
            if gone.is_set() or (cancel is not None and cancel.is_set()):
                out.put(Cancelled(reason(cancel)))
                continue
            try:
                for chunk in make():
                    if gone.is_set():
                        break
                    out.put(chunk)
                out.put(DONE)
            except BaseException as error:  # handed to the waiting caller, who decides what it means
                out.put(error)


class Engine:
    """Common interface. Subclasses set ``name`` and implement ``speakers`` and ``_synthesize``; ``max_batch``
    is how many requests it works on at once (1: ``_synthesize`` runs on the engine's own serial thread)."""

    name = "engine"
    description = ""
    max_batch = 1
    caches_segments = False  # True: _synthesize takes cache= (a cache.CacheUse) and keys segments by cache_identity
    uses_plan = False  # _synthesize accepts plan= (the Plan's data)
    sampled = False  # _synthesize accepts seed= (engines whose random draws can be seeded; others ignore seeds)
    _executor: SerialExecutor | None = None

    @property
    def busy(self) -> int:
        """Syntheses still running or queued inside the engine (cancelled ones included until they stop)."""
        return 0

    def plan(self, text: str, normalize: bool = True) -> Plan:
        """The cost of ``text`` before synthesis; raises SynthesisError when it has nothing to speak."""
        return Plan(units=len(text))

    def speakers(self) -> list[Speaker]:
        raise NotImplementedError

    def resolve_speaker(self, name: str) -> Speaker | None:
        """Find a speaker by id or alias (aliases match case-insensitively)."""
        for speaker in self.speakers():
            if name == speaker.id or name.strip().lower() == speaker.alias.lower():
                return speaker
        return None

    def unreadable(self, text: str) -> str | None:
        """Why this engine cannot read ``text`` at all (a message for the client), or None. Checked before the
        request queues, so that it is answered at once."""
        return None

    def synthesize(self, text: str, speaker: Speaker, speed: float = 1.0, normalize: bool = True,
                   cancel: threading.Event | None = None, cache=None, plan: Plan | None = None,
                   seed: int | None = None) -> Iterator[np.ndarray]:
        """Yield float32 mono chunks at OUTPUT_RATE; raise SynthesisError for text with nothing to speak and
        Cancelled as soon as ``cancel`` (a cancel.CancelToken or a threading.Event) is set. ``cache``: the
        request's cache.CacheUse, used by engines with ``caches_segments`` (its status says what was found).
        ``plan``: this text's ``plan(text, normalize)`` when the caller has it already. ``seed``: the same text,
        speaker and seed give the same audio (``sampled`` engines; such a request bypasses the audio cache)."""
        extra = {"cache": cache} if cache is not None and self.caches_segments else {}
        if self.uses_plan and plan is not None:
            extra["plan"] = plan
        if self.sampled and seed is not None:
            extra["seed"] = seed
        if self.max_batch > 1:
            chunks = self._synthesize(text, speaker, speed, normalize, cancel, **extra)
        else:
            if self._executor is None:
                self._executor = SerialExecutor(f"{self.name}-synthesis")
            chunks = self._executor.run(lambda: self._synthesize(text, speaker, speed, normalize, cancel, **extra),
                                        cancel)
        for chunk in chunks:
            if poll(cancel):
                raise Cancelled(reason(cancel))
            yield chunk

    def _synthesize(self, text, speaker, speed, normalize, cancel) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def cache_identity(self) -> str:
        """What besides speaker, tempo, position and text tokens decides a segment's audio (engines with
        ``caches_segments``): part of every cache key."""
        raise NotImplementedError

    def warmup(self) -> tuple[int, float, float]:
        """Run one short synthesis so that the first real request is not slow, then time one more: -> (text units,
        audio seconds, synthesis seconds) of that one, a first figure for the engine's speed."""
        speaker = self.speakers()[0]
        for _ in self.synthesize("Hello.", speaker):
            pass
        text = "Hello, this is a test."
        plan = self.plan(text)
        started = time.perf_counter()
        samples = sum(chunk.size for chunk in self.synthesize(text, speaker, plan=plan))
        return plan.units, samples / OUTPUT_RATE, time.perf_counter() - started
