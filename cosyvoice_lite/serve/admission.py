"""Admission in front of the engine: how many requests a worker holds, and the path from a request to its audio.

Why bounded admission: a worker decodes ``max_batch`` requests side by side (CosyVoice's scheduler batches their
LLM steps and flow chunks) and keeps at most ``queue_size`` more waiting. Anything beyond gets an immediate 503
with Retry-After instead of joining a pile-up in which every client times out. An admitted request's own thread
hands it straight to the engine and waits for its chunks; /health and /metrics are served by other threads.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time

import numpy as np

from ..cache import CacheUse
from ..cancel import AUDIO_LIMIT, CANCELLED, STOPPING, Cancelled, CancelToken
from ..engines import OUTPUT_RATE, Engine, Plan, Speaker, SynthesisError

log = logging.getLogger("cosyvoice_lite")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class EngineFailure(Exception):
    """The engine raised something unexpected; details are in the server log, not in the response."""


class OverBudget(Exception):
    """The request cannot be served within the limits; ``message`` says why and what to do instead."""

    def __init__(self, message: str, audio_s: float, synth_s: float):
        super().__init__(message)
        self.message, self.audio_s, self.synth_s = message, audio_s, synth_s


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


class Job:
    def __init__(self, text: str, speaker: Speaker, speed: float = 1.0, normalize: bool = True, request_id: str = "",
                 deadline: float | None = None, client_gone=None, cache=None, plan: Plan | None = None,
                 max_audio_s: float | None = None, seed: int | None = None):
        self.text, self.speaker, self.speed, self.normalize = text, speaker, speed, normalize
        self.seed = seed
        self.cache = CacheUse(cache)  # the audio cache this request may use (None: off); status set by the engine
        self.request_id = request_id
        self.plan = plan
        self.max_samples = int(max_audio_s * OUTPUT_RATE) if max_audio_s else None
        self.cancel = CancelToken(deadline, client_gone)  # the one cancellation of this request
        self.created = time.monotonic()
        self.started: float | None = None
        self.first_audio: float | None = None  # seconds from the start of synthesis to the first chunk
        self.samples = 0
        self.synth_seconds = 0.0

    def synthesis_seconds(self) -> float | None:
        """Seconds of synthesis: until it ended, or so far while it runs; None if it never started."""
        if self.started is None:
            return None
        return self.synth_seconds or time.perf_counter() - self.started


class Admission:
    """Bounded admission in front of one engine: at most ``max_batch`` requests in progress and ``queue_size``
    waiting per worker process. The engine's own scheduler decides who is served first."""

    def __init__(self, engine: Engine, queue_size: int, max_batch: int | None = None,
                 on_change=lambda waiting, running: None):
        self.engine = engine
        self._on_change = on_change
        self.queue_size = queue_size
        self.max_batch = max(1, min(max_batch or engine.max_batch, engine.max_batch))
        self.capacity = queue_size + self.max_batch
        self.speed = Speed()
        self._pid = None
        self._start_lock = threading.Lock()
        self._reset()

    def _reset(self):
        # Fresh primitives for this process: a lock inherited across fork may be in any state.
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self._recent = collections.deque(maxlen=16)  # wall seconds of recent jobs, for Retry-After
        self.ready = threading.Event()
        self.failure: str | None = None
        self._stopping = False

    # ---- life cycle -------------------------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Warm the engine up in this process (again after a fork) on a thread of its own; ``ready`` is set when
        it is done. Requests are admitted meanwhile: the engine serves them after the warm-up's first chunk."""
        if self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._reset()
            self._pid = os.getpid()
            threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
        self._changed()  # registers this process with the shared metrics

    def _warm_up(self) -> None:
        try:
            started = time.monotonic()
            measured = self.engine.warmup()
            if measured:
                self.speed.observe(*measured)
            log.info("engine %s warmed up in %.2f s (pid %d); %s", self.engine.name, time.monotonic() - started,
                     os.getpid(), self.describe_speed())
        except Exception as e:  # a model that cannot speak must not look ready
            log.exception("engine warm-up failed")
            self.failure = f"engine warm-up failed: {type(e).__name__}: {e}"
        self.ready.set()

    def describe_speed(self) -> str:
        rtf, per_unit = self.speed.rtf, self.speed.audio_per_unit
        if rtf is None or per_unit is None:
            return "speed not measured"
        return f"real-time factor {rtf:.2f}, {per_unit:.3f} s of audio per text unit"

    def check_budget(self, plan: Plan, speed: float, stream: bool, remaining_s: float, max_audio_s: float) -> None:
        """Refuse (OverBudget) what cannot be served: audio that must pass MAX_AUDIO_SECONDS, or a whole
        (non-streamed) answer that cannot be ready before REQUEST_TIMEOUT at the measured speed."""
        audio1, synth = self.speed.estimate(plan)
        audio = audio1 / speed
        if plan.min_audio_s / speed > max_audio_s or (not stream and audio > max_audio_s):
            raise OverBudget(f"this text is about {audio:.0f} s of speech, more than MAX_AUDIO_SECONDS="
                             f"{max_audio_s:g} allows; split it into shorter requests", audio, synth)
        if not stream and synth > remaining_s:
            raise OverBudget(f"this text is about {audio:.0f} s of speech, which takes about {synth:.0f} s to "
                             f"synthesise here, more than the {remaining_s:.0f} s REQUEST_TIMEOUT leaves; send it "
                             f'with "stream": true (audio as it is made) or split it', audio, synth)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel.set(STOPPING)

    def wait_ready(self, timeout: float) -> bool:
        self.ensure_started()
        return self.ready.wait(timeout)

    # ---- state ------------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Requests in progress, and work of finished or cancelled ones that the engine has not stopped yet."""
        return max(min(len(self._jobs), self.max_batch), self.engine.busy - self.waiting)

    @property
    def waiting(self) -> int:
        return max(0, len(self._jobs) - self.max_batch)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean job time over the places in progress, 1..60."""
        per_job = (sum(self._recent) / len(self._recent)) if self._recent else 2.0
        return int(min(60, max(1, math.ceil(per_job / self.max_batch))))

    # ---- requests ---------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self.ensure_started()
        with self._lock:
            if self._stopping or len(self._jobs) >= self.capacity:
                raise QueueFull(self.retry_after())
            self._jobs.add(job)
        self._changed()

    def abandon(self, job: Job) -> None:
        """The client no longer wants ``job`` (or has all of it): stop its work and free its place."""
        job.cancel.set(CANCELLED)
        self._release(job)

    def _release(self, job: Job) -> None:
        with self._lock:
            if job not in self._jobs:
                return
            self._jobs.discard(job)
            if job.samples:
                self._recent.append(time.monotonic() - job.created)
        self._changed()

    def _changed(self) -> None:
        try:
            self._on_change(self.waiting, self.running)
        except Exception:  # metrics must never stop synthesis
            log.exception("queue metrics update failed")

    def results(self, job: Job):
        """Synthesise ``job`` in the calling thread's request (the engine batches it with the others) and yield
        its chunks as they come. Raises Cancelled (reason 'timeout', 'client_gone', ...), SynthesisError or
        EngineFailure; the caller must ``abandon`` the job whatever happens (a finished job ignores it)."""
        if self.failure:
            raise EngineFailure(self.failure)
        job.started = time.perf_counter()
        try:
            chunks = self.engine.synthesize(job.text, job.speaker, job.speed, job.normalize, job.cancel,
                                            cache=job.cache, plan=job.plan, seed=job.seed)
            for chunk in chunks:
                chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
                if job.first_audio is None:
                    job.first_audio = time.perf_counter() - job.started
                if job.max_samples is not None and job.samples + chunk.size > job.max_samples:
                    chunk = chunk[:job.max_samples - job.samples]
                    job.samples += chunk.size
                    if chunk.size:
                        yield chunk
                    job.cancel.set(AUDIO_LIMIT)
                    raise Cancelled(AUDIO_LIMIT)
                job.samples += chunk.size
                yield chunk
            if job.plan is not None and job.cache.status in ("miss", "off"):  # cached audio says nothing of speed
                self.speed.observe(job.plan.units, job.samples * job.speed / OUTPUT_RATE,
                                   time.perf_counter() - job.started)
        except Cancelled as e:
            if job.cancel.reason and job.cancel.reason != e.reason:  # the token knows why (deadline, client gone)
                raise Cancelled(job.cancel.reason) from None
            raise
        except (SynthesisError, GeneratorExit):
            raise
        except Exception as e:
            log.exception("synthesis failed (request %s)", job.request_id)
            raise EngineFailure(f"{type(e).__name__} during synthesis") from None
        finally:
            job.synth_seconds = time.perf_counter() - job.started
            self._release(job)
