"""Admission in front of the engine, and metrics shared by all worker processes.

Why bounded admission: a worker decodes ``max_batch`` requests side by side (CosyVoice's scheduler batches their
LLM steps and flow chunks) and keeps at most ``queue_size`` more waiting. Anything beyond gets an immediate 503
with Retry-After instead of joining a pile-up in which every client times out. An admitted request's own thread
hands it straight to the engine and waits for its chunks; /health and /metrics are served by other threads.
"""
from __future__ import annotations

import collections
import logging
import math
import mmap
import multiprocessing
import os
import threading
import time

import numpy as np

from .cancel import CANCELLED, STOPPING, Cancelled, CancelToken
from .engines import Engine, Speaker, SynthesisError

log = logging.getLogger("cosyvoice_lite")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class EngineFailure(Exception):
    """The engine raised something unexpected; details are in the server log, not in the response."""


class Job:
    def __init__(self, text: str, speaker: Speaker, speed: float = 1.0, normalize: bool = True, request_id: str = "",
                 deadline: float | None = None, client_gone=None):
        self.text, self.speaker, self.speed, self.normalize = text, speaker, speed, normalize
        self.request_id = request_id
        self.cancel = CancelToken(deadline, client_gone)  # the one cancellation of this request
        self.state = "new"   # new -> admitted -> done
        self.created = time.monotonic()
        self.started: float | None = None
        self.first_audio: float | None = None  # seconds from admission to the first chunk
        self.samples = 0
        self.synth_seconds = 0.0


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
            self.engine.warmup()
            log.info("engine %s warmed up in %.2f s (pid %d)", self.engine.name, time.monotonic() - started,
                     os.getpid())
        except Exception as e:  # a model that cannot speak must not look ready
            log.exception("engine warm-up failed")
            self.failure = f"engine warm-up failed: {type(e).__name__}: {e}"
        self.ready.set()

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
    def admitted(self) -> int:
        return len(self._jobs)

    @property
    def running(self) -> int:
        return min(len(self._jobs), self.max_batch)

    @property
    def waiting(self) -> int:
        return len(self._jobs) - self.running

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
            job.state = "admitted"
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
            job.state = "done"
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
            chunks = self.engine.synthesize(job.text, job.speaker, job.speed, job.normalize, job.cancel)
            for chunk in chunks:
                chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
                if job.first_audio is None:
                    job.first_audio = time.perf_counter() - job.started
                job.samples += chunk.size
                yield chunk
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


class Metrics:
    """Counters for /metrics, kept in an anonymous shared memory map created before gunicorn forks (preload), so
    every worker's numbers add up in whichever worker answers the scrape. Each process writes only its own slot;
    a slot left by a dead worker is taken over with its counters (they stay monotonic) and its gauges zeroed."""

    ENDPOINTS = ("tts", "speech", "voices", "speakers", "health", "ready", "metrics", "openapi", "page", "other")
    CODES = (200, 204, 304, 400, 401, 404, 405, 408, 413, 415, 499, 500, 503, 504, 0)  # 0 = any other
    BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, math.inf)
    SLOTS = 64

    # slot layout (float64 each)
    _PID, _AUDIO, _SYNTH, _CHARS, _WAITING, _RUNNING, _DUR_SUM, _HEAD = range(8)

    def __init__(self):
        self._n_req = len(self.ENDPOINTS) * len(self.CODES)
        self._slot_len = self._HEAD + self._n_req + len(self.BUCKETS)
        self._map = mmap.mmap(-1, self.SLOTS * self._slot_len * 8)
        self._table = np.frombuffer(self._map, dtype=np.float64).reshape(self.SLOTS, self._slot_len)
        try:
            self._claim_lock = multiprocessing.Lock()
        except (OSError, ImportError):  # no /dev/shm: per-process metrics only
            self._claim_lock = threading.Lock()
        self._slot = None
        self._slot_pid = None
        self._lock = threading.Lock()
        self._private = np.zeros(self._slot_len)

    def _my_slot(self) -> np.ndarray:
        pid = os.getpid()
        if self._slot_pid == pid:
            return self._slot
        self._lock = threading.Lock()
        acquired = self._claim_lock.acquire(timeout=2.0)
        try:
            rows = [i for i in range(self.SLOTS) if not _alive(int(self._table[i, self._PID]))]
            slot = self._table[rows[0]] if rows else self._private
            slot[self._PID] = pid
            slot[self._WAITING] = slot[self._RUNNING] = 0
        finally:
            if acquired:
                self._claim_lock.release()
        self._slot, self._slot_pid = slot, pid
        return slot

    def observe_request(self, endpoint: str, status: int, seconds: float | None = None, chars: int = 0,
                        audio_seconds: float = 0.0, synth_seconds: float = 0.0) -> None:
        e = self.ENDPOINTS.index(endpoint) if endpoint in self.ENDPOINTS else len(self.ENDPOINTS) - 1
        c = self.CODES.index(status) if status in self.CODES else len(self.CODES) - 1
        slot = self._my_slot()
        with self._lock:
            slot[self._HEAD + e * len(self.CODES) + c] += 1
            slot[self._AUDIO] += audio_seconds
            slot[self._SYNTH] += synth_seconds
            slot[self._CHARS] += chars
            if seconds is not None:  # latency histogram of synthesis requests
                slot[self._DUR_SUM] += seconds
                b = next(i for i, edge in enumerate(self.BUCKETS) if seconds <= edge)
                slot[self._HEAD + self._n_req + b] += 1

    def set_queue(self, waiting: int, running: int) -> None:
        slot = self._my_slot()
        slot[self._WAITING] = waiting
        slot[self._RUNNING] = running

    def render(self, engine: str, ready: bool, capacity: int) -> str:
        live = [row for row in self._table if row[self._PID] and _alive(int(row[self._PID]))]
        total = self._table.sum(axis=0)  # counters: every slot, dead workers' included
        if self._slot is self._private:
            total = total + self._private
            live.append(self._private)
        gauges = np.sum(live, axis=0) if live else np.zeros(self._slot_len)
        out = []

        def metric(name, kind, help_text, samples):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_num(value)}" for labels, value in samples)

        requests = total[self._HEAD:self._HEAD + self._n_req].reshape(len(self.ENDPOINTS), len(self.CODES))
        metric("cosyvoice_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [(f'{{endpoint="{ep}",code="{code or "other"}"}}', requests[i, j])
                for i, ep in enumerate(self.ENDPOINTS) for j, code in enumerate(self.CODES) if requests[i, j]])
        by_code = requests.sum(axis=0)
        metric("cosyvoice_errors_total", "counter", "HTTP responses with a 4xx/5xx status, by status code.",
               [(f'{{code="{code or "other"}"}}', by_code[j]) for j, code in enumerate(self.CODES)
                if (code == 0 or code >= 400) and by_code[j]])
        metric("cosyvoice_audio_seconds_total", "counter", "Seconds of audio synthesised.",
               [("", total[self._AUDIO])])
        metric("cosyvoice_synthesis_seconds_total", "counter", "Seconds spent synthesising.",
               [("", total[self._SYNTH])])
        metric("cosyvoice_characters_total", "counter", "Characters of text synthesised.",
               [("", total[self._CHARS])])
        buckets = np.cumsum(total[self._HEAD + self._n_req:])
        metric("cosyvoice_request_duration_seconds", "histogram",
               "Wall time of synthesis requests (to the last byte).",
               [(f'_bucket{{le="{"+Inf" if math.isinf(edge) else edge}"}}', buckets[i])
                for i, edge in enumerate(self.BUCKETS)]
               + [("_sum", total[self._DUR_SUM]), ("_count", buckets[-1])])
        metric("cosyvoice_queue_depth", "gauge", "Requests waiting for synthesis (all workers).",
               [("", gauges[self._WAITING])])
        metric("cosyvoice_in_progress", "gauge", "Requests being synthesised (all workers).",
               [("", gauges[self._RUNNING])])
        metric("cosyvoice_queue_capacity", "gauge", "Requests one worker holds (waiting + synthesising).",
               [("", capacity)])
        metric("cosyvoice_workers", "gauge", "Worker processes that have served a request.", [("", len(live))])
        metric("cosyvoice_ready", "gauge", "1 when this worker's engine is loaded and warmed up.",
               [("", 1 if ready else 0)])
        metric("cosyvoice_engine_info", "gauge", "The engine serving requests.", [(f'{{engine="{engine}"}}', 1)])
        return "\n".join(out) + "\n"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _num(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)
