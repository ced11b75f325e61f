"""Admission in front of the engine: how many syntheses a worker holds, and the engine's measured speed.

Why bounded admission: a worker decodes ``max_batch`` requests side by side (CosyVoice's scheduler batches their
LLM steps and flow chunks) and keeps at most ``queue_size`` more waiting. Anything beyond is refused at once
(QueueFull, with a Retry-After) instead of joining a pile-up in which every client times out.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time

from ..engines import Engine, Plan
from ..forks import PerProcess
from .errors import OverBudget, QueueFull

log = logging.getLogger("cosyvoice_lite")


class Speed:
    """The engine's measured speed, kept up to date from finished requests: seconds of synthesis per second of
    audio (at speed 1) and seconds of audio per text unit. Exponential moving averages, so that a changed load
    shows within a few requests; ``None`` until measured."""

    WEIGHT = 0.3  # of each new observation

    def __init__(self):
        self.rtf: float | None = None
        self.audio_per_unit: float | None = None
        self._lock = threading.Lock()

    def observe(self, units: int, audio_s: float, synth_s: float) -> None:
        if units <= 0 or audio_s <= 0:
            return
        with self._lock:
            self.rtf = self._mix(self.rtf, synth_s / audio_s)
            self.audio_per_unit = self._mix(self.audio_per_unit, audio_s / units)

    def _mix(self, old, new):
        return new if old is None else (1 - self.WEIGHT) * old + self.WEIGHT * new

    def estimate(self, plan: Plan) -> tuple[float, float]:
        """(audio seconds at speed 1, synthesis seconds) expected for ``plan``, within the plan's bounds."""
        per_unit = self.audio_per_unit if self.audio_per_unit is not None else 0.0
        audio = min(max(plan.units * per_unit, plan.min_audio_s), plan.max_audio_s)
        return audio, audio * (self.rtf or 0.0)

    def describe(self) -> str:
        if self.rtf is None or self.audio_per_unit is None:
            return "speed not measured"
        return f"real-time factor {self.rtf:.2f}, {self.audio_per_unit:.3f} s of audio per text unit"


class _ProcessState:
    """What admission keeps per worker process (made again after a fork, see forks.py)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held: set = set()
        self.recent = collections.deque(maxlen=16)  # wall seconds of recent syntheses, for Retry-After
        self.ready = threading.Event()
        self.failure: str | None = None


class Admission:
    """At most ``max_batch`` syntheses in progress and ``queue_size`` waiting per worker process. The engine's own
    scheduler decides who is served first. The engine warms up on a thread of its own in each process, at the
    first admission or ``ensure_started``; until then syntheses are admitted and wait for it."""

    def __init__(self, engine: Engine, queue_size: int, max_batch: int | None = None,
                 on_change=lambda waiting, running: None):
        self.engine = engine
        self._on_change = on_change
        self.queue_size = queue_size
        self.max_batch = max(1, min(max_batch or engine.max_batch, engine.max_batch))
        self.capacity = queue_size + self.max_batch
        self.speed = Speed()
        self._state = PerProcess(self._start)

    # ---- life cycle -------------------------------------------------------------------------------------
    def _start(self) -> _ProcessState:
        state = _ProcessState()
        threading.Thread(target=self._warm_up, args=(state,), name="warm-up", daemon=True).start()
        return state

    def ensure_started(self) -> None:
        """Start this process's warm-up (gunicorn calls it after the fork; the first admission would)."""
        if not self._state.made():
            self._state.get()
            self._changed()  # registers this process with the shared metrics

    def _warm_up(self, state: _ProcessState) -> None:
        try:
            started = time.monotonic()
            measured = self.engine.warmup()
            if measured:
                self.speed.observe(*measured)
            log.info("engine %s warmed up in %.2f s; %s", self.engine.name, time.monotonic() - started,
                     self.speed.describe())
        except Exception as e:  # a model that cannot speak must not look ready
            log.exception("engine warm-up failed")
            state.failure = f"engine warm-up failed: {type(e).__name__}: {e}"
        state.ready.set()

    @property
    def ready(self) -> threading.Event:
        return self._state.get().ready

    @property
    def failure(self) -> str | None:
        return self._state.get().failure

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout)

    def check_budget(self, plan: Plan, speed: float, stream: bool, remaining_s: float, max_audio_s: float) -> None:
        """Refuse (OverBudget) what cannot be served: audio that must pass MAX_AUDIO_SECONDS, or a whole
        (non-streamed) answer that cannot be ready before REQUEST_TIMEOUT at the measured speed."""
        audio1, synth = self.speed.estimate(plan)
        audio = audio1 / speed
        extra = {"param": "text", "audio_seconds": round(audio, 1), "synthesis_seconds": round(synth, 1)}
        if plan.min_audio_s / speed > max_audio_s or (not stream and audio > max_audio_s):
            raise OverBudget(f"this text is about {audio:.0f} s of speech, more than MAX_AUDIO_SECONDS="
                             f"{max_audio_s:g} allows; split it into shorter requests", **extra)
        if not stream and synth > remaining_s:
            raise OverBudget(f"this text is about {audio:.0f} s of speech, which takes about {synth:.0f} s to "
                             f"synthesise here, more than the {remaining_s:.0f} s REQUEST_TIMEOUT leaves; send it "
                             f'with "stream": true (audio as it is made) or split it', **extra)

    # ---- state ------------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Syntheses in progress, and work of finished or cancelled ones that the engine has not stopped yet."""
        return max(min(len(self._state.get().held), self.max_batch), self.engine.busy - self.waiting)

    @property
    def waiting(self) -> int:
        return max(0, len(self._state.get().held) - self.max_batch)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean synthesis time over the places in progress, 1..60."""
        recent = self._state.get().recent
        per_job = (sum(recent) / len(recent)) if recent else 2.0
        return int(min(60, max(1, math.ceil(per_job / self.max_batch))))

    # ---- places -----------------------------------------------------------------------------------------
    def admit(self, holder) -> None:
        """Take a place for ``holder`` or raise QueueFull."""
        state = self._state.get()
        with state.lock:
            full = len(state.held) >= self.capacity
            if not full:
                state.held.add(holder)
        if full:
            retry = self.retry_after()
            raise QueueFull(f"the server is busy ({self.capacity} requests in progress or waiting); retry in "
                            f"{retry} s", retry_after=retry)
        self._changed()

    def release(self, holder, seconds: float | None = None) -> None:
        """Free ``holder``'s place (again: nothing); ``seconds``: how long it took, when it produced audio."""
        state = self._state.get()
        with state.lock:
            if holder not in state.held:
                return
            state.held.discard(holder)
            if seconds is not None:
                state.recent.append(seconds)
        self._changed()

    def holders(self) -> list:
        state = self._state.get()
        with state.lock:
            return list(state.held)

    def _changed(self) -> None:
        try:
            self._on_change(self.waiting, self.running)
        except Exception:  # metrics must never stop synthesis
            log.exception("queue metrics update failed")
