"""Sentence-level audio cache: a text segment's 24 kHz audio, keyed by everything that decides it.

The engine looks every segment of a request up before it yields the first chunk, synthesises only the segments
not found and stores them when they are complete. The cache never fails a request: a backend that is full,
corrupt, read-only, down or slow makes the request a miss (synthesised), logs one warning when the trouble
starts and one line when it is over, and is left alone for ``RETRY_AFTER`` seconds in between so that a dead
Redis does not cost every request a timeout.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable

import numpy as np

from .backends import DiskBackend, RedisBackend
from .codec import CorruptEntry, dequantize, pack, quantize, unpack

__all__ = ["AudioCache", "DiskBackend", "RedisBackend", "dequantize", "open_cache", "quantize",
           "segment_key"]

log = logging.getLogger("cosyvoice_lite")

# Part of every key: bump it when a change of the synthesis code changes the audio that a key stands for.
# 2: the text embedding is float32 in every mode; 3: float16 key/value cache; 4: keyed by the voice's fingerprint
KEY_VERSION = "cvl-segment-4"
RETRY_AFTER = 5.0  # seconds a failed backend is skipped before it is tried again


def segment_key(identity: str, voice: str, speed: float, lead: bool, segment: bytes) -> str:
    """sha256 of what decides a segment's audio: the engine's identity (engine, model hash, mode, precision...),
    the voice's fingerprint, the tempo, whether the segment was synthesised with the first-chunk rules of a stream
    (``lead``), and the segment itself (its text token ids after normalisation: Segment.key())."""
    h = hashlib.sha256()
    h.update(f"{KEY_VERSION}\n{identity}\n{voice}\n{float(speed)!r}\n{'lead' if lead else 'rest'}\n".encode())
    h.update(segment)
    return h.hexdigest()


class AudioCache:
    """Fault-tolerant front of a backend. ``count(name, amount)`` receives 'hits', 'misses', 'bytes' (stored),
    'evictions', 'corrupt' and 'errors' for /metrics."""

    def __init__(self, backend, count: Callable[[str, float], None] | None = None):
        self.backend = backend
        self._count_cb = count
        self._lock = threading.Lock()
        self._skip_until = {"read": 0.0, "write": 0.0}
        self._incidents: dict[str, str] = {}  # kind -> what went wrong, while it lasts

    # ---- requests ---------------------------------------------------------------------------------------
    def lookup(self, candidates: list[list[str]]) -> list[np.ndarray | None]:
        """For each segment, the int16 samples of the first of its candidate keys found, else None."""
        found: list[np.ndarray | None] = [None] * len(candidates)
        flat = [key for keys in candidates for key in keys]
        blobs = self._call("read", self.backend.get_many, flat) if flat and self._usable("read") else None
        if blobs is not None:
            blobs = dict(zip(flat, blobs))
            for i, keys in enumerate(candidates):
                for key in keys:
                    pcm = self._decode(key, blobs.get(key))
                    if pcm is not None:
                        found[i] = pcm
                        break
        hits = sum(pcm is not None for pcm in found)
        self._count("hits", hits)
        self._count("misses", len(found) - hits)
        return found

    def store(self, key: str, pcm: np.ndarray) -> None:
        if not self._usable("write"):
            return
        blob = pack(pcm)
        evicted = self._call("write", self.backend.put, key, blob)
        if evicted is not None:
            self._count("bytes", len(blob))
            self._count("evictions", evicted)

    # ---- operations -------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """For /ready: the backend, its settings, and whether it currently works."""
        troubles = dict(self._incidents)
        return {**self.backend.describe(), "state": "failing" if troubles else "ok",
                **({"problem": "; ".join(troubles.values())} if troubles else {})}

    def stats(self) -> dict:
        """Backend figures for /metrics (size on disk, Redis' own evictions); empty while it fails."""
        if not self._usable("read"):
            return {}
        return self._call("read", self.backend.stats) or {}

    # ---- faults -----------------------------------------------------------------------------------------
    def _usable(self, kind: str) -> bool:
        return time.monotonic() >= self._skip_until[kind]

    def _call(self, kind: str, fn, *args):
        try:
            result = fn(*args)
        except Exception as error:  # any backend trouble means: synthesise instead
            self._count("errors", 1)
            until = time.monotonic() + RETRY_AFTER
            self._skip_until[kind] = until
            if kind == "read":  # a backend that cannot read will not write either
                self._skip_until["write"] = until
            self._trouble(kind, f"{type(error).__name__}: {error}")
            return None
        self._recovered(kind)
        return result

    def _decode(self, key: str, blob) -> np.ndarray | None:
        if blob is None:
            return None
        try:
            pcm = unpack(blob)
        except CorruptEntry as error:
            self._count("corrupt", 1)
            self._trouble("corrupt", f"entry {key[:12]}... dropped ({error})")
            self._call("write", self.backend.delete, key)
            return None
        self._recovered("corrupt")
        return pcm

    def _trouble(self, kind: str, what: str) -> None:
        with self._lock:
            # one warning per incident: a Redis that is down fails its reads and then its writes
            same = (kind,) if kind == "corrupt" else ("read", "write")
            new = not any(k in self._incidents for k in same)
            self._incidents[kind] = what
        if not new:
            return
        if kind == "corrupt":
            log.warning("audio cache (%s) has a corrupt entry: %s; it is synthesised again", self.backend.name, what)
        else:
            log.warning("audio cache (%s) %s failed: %s; requests are synthesised without it, retried every %.0f s",
                        self.backend.name, kind, what, RETRY_AFTER)

    def _recovered(self, kind: str) -> None:
        if kind in self._incidents:
            with self._lock:
                what = self._incidents.pop(kind, None)
                over = kind == "corrupt" or not any(k in self._incidents for k in ("read", "write"))
            if what is not None and over:
                log.info("audio cache (%s) works again (after: %s)", self.backend.name, what)

    def _count(self, name: str, amount: float) -> None:
        if amount and self._count_cb is not None:
            try:
                self._count_cb(name, amount)
            except Exception:  # metrics must never stop synthesis
                log.exception("cache metrics update failed")


def open_cache(setting: str, cache_root: str, max_mb: int, ttl: int, count=None) -> AudioCache | None:
    """The AudioCache a CACHE setting asks for: 'disk' (under ``<cache_root>/audio``), 'off' (None) or a Redis URL."""
    setting = setting.strip()
    if setting.lower() == "off":
        return None
    if setting.lower() == "disk":
        backend = DiskBackend(os.path.join(cache_root, "audio"), max_mb * 2 ** 20, ttl)
    else:
        backend = RedisBackend(setting, ttl)
    return AudioCache(backend, count)
