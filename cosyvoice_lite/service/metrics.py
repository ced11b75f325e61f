"""Counters and gauges for /metrics, shared by all worker processes of one server."""
from __future__ import annotations

import math
import mmap
import multiprocessing
import os
import threading

import numpy as np


class Metrics:
    """Counters for /metrics, kept in an anonymous shared memory map created before gunicorn forks (preload), so
    every worker's numbers add up in whichever worker answers the scrape. Each process writes only its own slot;
    a slot left by a dead worker is taken over with its counters (they stay monotonic) and its gauges zeroed."""

    ENDPOINTS = ("tts", "speech", "voices", "speakers", "health", "ready", "metrics", "openapi", "page", "other")
    CODES = (200, 204, 304, 400, 401, 404, 405, 408, 413, 415, 499, 500, 503, 504, 0)  # 0 = any other
    BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, math.inf)
    SLOTS = 64

    # audio cache counters (cache.AudioCache's names) -> (metric, help)
    CACHE_COUNTERS = {
        "hits": ("cosyvoice_cache_hits_total", "Text segments served from the audio cache."),
        "misses": ("cosyvoice_cache_misses_total", "Text segments looked up and not found (synthesised)."),
        "bytes": ("cosyvoice_cache_stored_bytes_total", "Bytes of audio written to the cache."),
        "evictions": ("cosyvoice_cache_evictions_total",
                      "Entries the disk cache evicted to stay under CACHE_MAX_MB (Redis: its evicted_keys)."),
        "corrupt": ("cosyvoice_cache_corrupt_total", "Corrupt cache entries detected and dropped."),
        "errors": ("cosyvoice_cache_errors_total", "Cache operations that failed (request synthesised instead)."),
    }

    # slot layout (float64 each)
    _PID, _AUDIO, _SYNTH, _CHARS, _WAITING, _RUNNING, _DUR_SUM, _CACHE = range(8)
    _HEAD = _CACHE + len(CACHE_COUNTERS)

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

    def count_cache(self, name: str, amount: float) -> None:
        slot = self._my_slot()
        with self._lock:
            slot[self._CACHE + list(self.CACHE_COUNTERS).index(name)] += amount

    def set_queue(self, waiting: int, running: int) -> None:
        slot = self._my_slot()
        slot[self._WAITING] = waiting
        slot[self._RUNNING] = running

    def render(self, engine: str, ready: bool, capacity: int, cache: dict | None = None) -> str:
        """``cache``: None when the audio cache is off, else the backend's figures (AudioCache.stats())."""
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
        if cache is not None:
            for i, (name, (metric_name, help_text)) in enumerate(self.CACHE_COUNTERS.items()):
                value = total[self._CACHE + i] + (cache.get("evictions", 0) if name == "evictions" else 0)
                metric(metric_name, "counter", help_text, [("", value)])
            if "bytes" in cache:
                metric("cosyvoice_cache_bytes", "gauge", "Bytes the disk cache holds now.", [("", cache["bytes"])])
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
