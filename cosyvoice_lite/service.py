"""What runs behind the HTTP routes: one synthesis thread per worker process fed by a bounded queue, and metrics
shared by all worker processes.

Why a queue of our own: the CPU does one synthesis at a time well, so each worker synthesises one request and
keeps at most ``queue_size`` more waiting. Anything beyond gets an immediate 503 with Retry-After instead of
joining a pile-up in which every client times out. Request threads only wait on their job's chunk queue, so
/health and /metrics answer while a long synthesis runs.
"""
from __future__ import annotations

import collections
import logging
import math
import mmap
import multiprocessing
import os
import queue
import threading
import time

import numpy as np

from .engine import Cancelled, Engine, Speaker, SynthesisError
from .memory import release_free_memory

log = logging.getLogger("cosyvoice_lite")

_DONE = object()


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class TimedOut(Exception):
    pass


class ClientGone(Exception):
    pass


class EngineFailure(Exception):
    """The engine raised something unexpected; details are in the server log, not in the response."""


class Job:
    def __init__(self, text: str, speaker: Speaker, speed: float = 1.0, normalize: bool = True, request_id: str = ""):
        self.text, self.speaker, self.speed, self.normalize = text, speaker, speed, normalize
        self.request_id = request_id
        self.cancel = threading.Event()
        self.chunks: queue.SimpleQueue = queue.SimpleQueue()
        self.state = "new"   # new -> queued -> running -> done, or queued -> abandoned
        self.created = time.monotonic()
        self.samples = 0
        self.synth_seconds = 0.0


class Synthesizer:
    """Bounded job queue in front of one engine, drained by one thread of this process."""

    def __init__(self, engine: Engine, queue_size: int, on_change=lambda waiting, running: None):
        self.engine = engine
        self._on_change = on_change
        self.queue_size = queue_size
        self.capacity = queue_size + 1  # waiting + the one being synthesised
        self._pid = None
        self._start_lock = threading.Lock()
        self._reset()

    def _reset(self):
        # Fresh primitives for this process: a lock inherited across fork may be in any state.
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._pending: collections.deque[Job] = collections.deque()
        self._admitted = 0
        self._running = 0
        self._recent = collections.deque(maxlen=16)  # wall seconds of recent jobs, for Retry-After
        self.ready = threading.Event()
        self.failure: str | None = None
        self._stopping = False

    # ---- life cycle -------------------------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Start the synthesis thread in this process (again after a fork; threads do not survive one)."""
        if self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._reset()
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="synthesis", daemon=True).start()
        self._changed()  # registers this process with the shared metrics

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for job in self._pending:
                job.state = "abandoned"
                job.cancel.set()
                job.chunks.put(EngineFailure("the service is stopping"))
            self._pending.clear()
            self._wakeup.notify_all()

    def wait_ready(self, timeout: float) -> bool:
        self.ensure_started()
        return self.ready.wait(timeout)

    # ---- state ------------------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    def retry_after(self) -> int:
        """Seconds until a place is likely free (the running job ends): the recent mean job time, 1..60."""
        per_job = (sum(self._recent) / len(self._recent)) if self._recent else 2.0
        return int(min(60, max(1, math.ceil(per_job))))

    # ---- requests ---------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self.ensure_started()
        with self._lock:
            if self._stopping or self._admitted >= self.capacity:
                raise QueueFull(self.retry_after())
            self._admitted += 1
            job.state = "queued"
            self._pending.append(job)
            self._wakeup.notify()
        self._changed()

    def abandon(self, job: Job) -> None:
        """The client no longer wants ``job``: stop it, and free its place at once if it has not started."""
        job.cancel.set()
        with self._lock:
            if job.state == "queued":
                job.state = "abandoned"
                try:
                    self._pending.remove(job)
                except ValueError:
                    pass
                self._admitted -= 1
        self._changed()

    def _changed(self) -> None:
        try:
            self._on_change(len(self._pending), self._running)
        except Exception:  # metrics must never stop synthesis
            log.exception("queue metrics update failed")

    def results(self, job: Job, deadline: float, client_gone=lambda: False, poll: float = 0.1):
        """Yield the job's chunks as they come. Raises TimedOut, ClientGone, SynthesisError or EngineFailure;
        the caller must ``abandon`` the job whatever happens (a finished job ignores it)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimedOut()
            try:
                item = job.chunks.get(timeout=min(poll, remaining))
            except queue.Empty:
                if client_gone():
                    raise ClientGone() from None
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # ---- the synthesis thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            started = time.monotonic()
            self.engine.warmup()
            log.info("engine %s warmed up in %.2f s (pid %d)", self.engine.name, time.monotonic() - started,
                     os.getpid())
        except Exception as e:  # a model that cannot speak must not look ready
            log.exception("engine warm-up failed")
            self.failure = f"engine warm-up failed: {type(e).__name__}: {e}"
        self.ready.set()
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                job.state = "running"
                self._running += 1
            self._changed()
            started = time.monotonic()
            try:
                self._synthesize(job)
            finally:
                with self._lock:
                    self._running -= 1
                    self._admitted -= 1
                    job.state = "done"
                    if job.synth_seconds:
                        self._recent.append(time.monotonic() - started)
                job.chunks.put(_DONE)
                self._changed()
                job = None  # drop this thread's reference before trimming
                release_free_memory()

    def _synthesize(self, job: Job) -> None:
        if job.cancel.is_set():
            return
        if self.failure:
            job.chunks.put(EngineFailure(self.failure))
            return
        started = time.perf_counter()
        try:
            for chunk in self.engine.synthesize(job.text, job.speaker, job.speed, job.normalize, job.cancel):
                chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
                job.samples += chunk.size
                job.chunks.put(chunk)
        except Cancelled:
            pass
        except SynthesisError as e:
            job.chunks.put(e)
        except Exception as e:
            log.exception("synthesis failed (request %s)", job.request_id)
            job.chunks.put(EngineFailure(f"{type(e).__name__} during synthesis"))
        finally:
            job.synth_seconds = time.perf_counter() - started


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
