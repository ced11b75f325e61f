"""The interface the synthesis service talks to: planned text segments + a Voice -> float32 mono chunks at
``OUTPUT_RATE``, as they come, with a mark after each segment's last chunk.

Two engines exist: ``CosyVoiceEngine`` (engines/cosyvoice.py, the product) and ``PiperEngine`` (engines/piper.py,
a small English fallback so that a box with no CosyVoice checkpoint still starts and speaks).

``synthesize`` may be called from many threads at once. An engine that batches concurrent requests itself
(CosyVoice's scheduler) says so with ``max_batch``; one that cannot (Piper) runs its requests one after another on
one thread of its own (``SerialExecutor``).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from ..audio import SAMPLE_RATE
from ..cancel import DONE, Cancelled, poll, reason, results
from ..forks import PerProcess
from ..voices import Voice

OUTPUT_RATE = SAMPLE_RATE

# Yielded by ``Engine.synthesize`` after the last chunk of each segment: the service cuts the audio into segments
# with it (the audio cache stores them one by one).
SEGMENT_END = object()


class SynthesisError(ValueError):
    """The request cannot be spoken (the message is safe to show to the client)."""


@dataclass(frozen=True)
class Segment:
    """One piece of a text that is synthesised (and cached) on its own: its text, and the engine's input for it
    (CosyVoice: its text token ids; the offline voice reads the text itself)."""
    text: str
    tokens: tuple[int, ...] = ()

    def key(self) -> bytes:
        """What of the segment decides its audio, for the cache key."""
        return np.asarray(self.tokens, dtype="<i4").tobytes() if self.tokens else self.text.encode("utf-8")


@dataclass(frozen=True)
class Plan:
    """What a text will cost, known before any synthesis: the engine's text units (CosyVoice: text tokens; other
    engines: characters), bounds on the audio it can give at speed 1 (seconds), and its segments (handed back to
    ``synthesize`` so that the frontend does not run twice)."""
    units: int
    segments: tuple[Segment, ...] = field(default_factory=tuple)
    min_audio_s: float = 0.0
    max_audio_s: float = float("inf")


@dataclass(frozen=True)
class Offers:
    """What a loaded model can do besides speaking with its own voices (CosyVoice-300M: the base model clones and
    converts, -SFT has speakers, -Instruct takes instructions)."""
    kind: str = ""                # the model's kind as recognised, e.g. 'sft'
    speakers: bool = True         # voices of its own
    cloning: bool = False         # a voice from a reference clip (zero-shot; cross-lingual without a transcript)
    instructions: bool = False    # how to speak, in words
    conversion: bool = False      # voice conversion of a source clip

    def listing(self) -> list[str]:
        names = {"speakers": "built-in speakers", "cloning": "voice cloning", "instructions": "instructions",
                 "conversion": "voice conversion"}
        return [text for key, text in names.items() if getattr(self, key)]


class SerialExecutor:
    """Runs synthesis generators one after another on one thread of this process (started again after a fork),
    for engines that cannot serve two requests at once; callers wait for their chunks and watch their cancel."""

    def __init__(self, name: str):
        self.name = name
        self._inbox = PerProcess(self._start)

    def _start(self) -> queue.SimpleQueue:
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, args=(inbox,), name=self.name, daemon=True).start()
        return inbox

    def run(self, make: Callable[[], Iterator[np.ndarray]], cancel=None) -> Iterator[np.ndarray]:
        out: queue.SimpleQueue = queue.SimpleQueue()
        gone = threading.Event()
        self._inbox.get().put((make, out, cancel, gone))
        try:
            yield from results(out, cancel)
        finally:
            gone.set()  # the worker drops this job at its next chunk

    @staticmethod
    def _loop(inbox: queue.SimpleQueue) -> None:
        while True:
            make, out, cancel, gone = inbox.get()
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
    """Common interface. Subclasses set ``name`` and implement ``voices``, ``identity`` and ``_synthesize``;
    ``max_batch`` is how many requests it works on at once (1: ``_synthesize`` runs on the engine's own serial
    thread)."""

    name = "engine"
    description = ""
    model_id = "engine"  # the model id it answers to on OpenAI's routes
    hint: str | None = None  # what an operator should do about this engine (shown by /speakers and /ready)
    offers = Offers()
    max_batch = 1
    _executor: SerialExecutor | None = None

    @property
    def busy(self) -> int:
        """Syntheses still running or queued inside the engine (cancelled ones included until they stop)."""
        return 0

    @property
    def realtime_factor(self) -> float | None:
        """Seconds of synthesis work per second of audio lately (None: not measured)."""
        return None

    def voices(self) -> list[Voice]:
        """The engine's own voices (CosyVoice: the checkpoint's speakers); the first is the default."""
        raise NotImplementedError

    def identity(self) -> str:
        """What besides voice, tempo, position and segment decides a segment's audio: part of every cache key."""
        raise NotImplementedError

    def plan(self, text: str, normalize: bool = True) -> Plan:
        """The cost and segments of ``text`` before synthesis; raises SynthesisError when it has nothing to speak."""
        return Plan(units=len(text), segments=(Segment(text),))

    def unreadable(self, text: str) -> str | None:
        """Why this engine cannot read ``text`` at all (a message for the client), or None. Checked before the
        request queues, so that it is answered at once."""
        return None

    def synthesize(self, segments: Sequence[Segment], voice: Voice, speed: float = 1.0, cancel=None,
                   seed: int | None = None) -> Iterator:
        """Yield float32 mono chunks at OUTPUT_RATE for ``segments`` in order, SEGMENT_END after each segment's
        last chunk; raise SynthesisError for text with nothing to speak and Cancelled as soon as ``cancel`` (a
        cancel.CancelToken or a threading.Event) is set. ``seed``: the same segments, voice and seed give the
        same audio. The first segment is streamed with the first-chunk rules (a short first chunk), whichever
        segment of its request it is."""
        if self.max_batch > 1:
            chunks = self._synthesize(segments, voice, speed, cancel, seed)
        else:
            if self._executor is None:
                self._executor = SerialExecutor(f"{self.name}-synthesis")
            chunks = self._executor.run(lambda: self._synthesize(segments, voice, speed, cancel, seed),
                                        cancel)
        for chunk in chunks:
            if poll(cancel):
                raise Cancelled(reason(cancel))
            yield chunk

    def _synthesize(self, segments, voice, speed, cancel, seed) -> Iterator:
        raise NotImplementedError

    def make_voice(self, samples: np.ndarray, rate: int, transcript: str | None, name: str, voice_id: str) -> Voice:
        """A Voice from a reference clip (mono float32 at ``rate``) and its transcript (None: cross-lingual)."""
        raise NotImplementedError

    def instructed(self, voice: Voice, instructions: str) -> Voice:
        """``voice`` told how to speak."""
        raise NotImplementedError

    def convert(self, samples: np.ndarray, rate: int, voice: Voice, cancel=None, seed: int | None = None) -> Iterator:
        """The speech of a source clip in ``voice`` (voice conversion): chunks at OUTPUT_RATE, then SEGMENT_END."""
        raise NotImplementedError

    def speak(self, text: str, voice: Voice | None = None, speed: float = 1.0, cancel=None,
              seed: int | None = None, normalize: bool = True) -> Iterator[np.ndarray]:
        """``text`` planned and synthesised, its chunks only (no admission, no cache: tools and warm-up)."""
        chunks = self.synthesize(self.plan(text, normalize).segments, voice or self.voices()[0], speed, cancel, seed)
        return (chunk for chunk in chunks if chunk is not SEGMENT_END)

    def warmup_voice(self) -> Voice:
        """The voice the warm-up speaks with: the default one."""
        return self.voices()[0]

    def warmup(self) -> tuple[int, float, float]:
        """Run one short synthesis so that the first real request is not slow, then time one more: -> (text units,
        audio seconds, synthesis seconds) of that one, a first figure for the engine's speed."""
        voice = self.warmup_voice()
        for _ in self.speak("Hello.", voice):
            pass
        text = "Hello, this is a test."
        started = time.perf_counter()
        samples = sum(chunk.size for chunk in self.speak(text, voice))
        return self.plan(text).units, samples / OUTPUT_RATE, time.perf_counter() - started
