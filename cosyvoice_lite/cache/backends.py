"""Where cached segments live: a size-bounded LRU ``diskcache.Cache`` shared by the workers of one machine, or a
Redis server shared by several machines. Backends only move bytes; faults are the caller's (``AudioCache``)."""
from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

from ..forks import PerProcess

# Redis must answer within this many seconds or the request is synthesised instead (a slow cache must cost less
# than the synthesis it saves).
REDIS_TIMEOUT = 0.25
# SQLite waits at most this long for another process's write lock on the disk cache.
DISK_LOCK_TIMEOUT = 1.0
OVERSHOOT = 1.1  # the disk cache may exceed its bound by this factor before it evicts more than one entry a write


class DiskBackend:
    """``diskcache.Cache`` in ``directory`` (SQLite index + value files; safe across processes), at most
    ``max_bytes`` with least-recently-used eviction, entries expiring after ``ttl`` seconds (0 = never)."""

    name = "disk"

    def __init__(self, directory: str, max_bytes: int, ttl: int = 0):
        self.directory = directory
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._cache = PerProcess(self._connect)  # opened again after a fork; a failed open is retried next call

    def _connect(self):
        import diskcache

        os.makedirs(self.directory, exist_ok=True)
        # cull_limit: entries evicted per write while over the bound (diskcache's 10 would empty a small cache at
        # once, recently used entries included; put() catches up on an overshoot)
        return diskcache.Cache(self.directory, timeout=DISK_LOCK_TIMEOUT, size_limit=self.max_bytes, cull_limit=1,
                               eviction_policy="least-recently-used")

    def _open(self):
        """The Cache of this process."""
        return self._cache.get()

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        cache = self._open()
        return [cache.get(key) for key in keys]

    def put(self, key: str, value: bytes) -> int:
        """Store ``value``; returns how many entries the size bound evicted to make room."""
        cache = self._open()
        with cache.transact():  # the count before and after belong to this write alone
            before = len(cache)
            added = cache.add(key, value, expire=self.ttl or None)
            if cache.volume() > OVERSHOOT * self.max_bytes:  # new entries larger than the ones they replaced
                cache.cull()
            after = len(cache)
        return max(0, before + int(added) - after)

    def delete(self, key: str) -> None:
        self._open().delete(key)

    def stats(self) -> dict:
        cache = self._open()
        return {"bytes": cache.volume(), "entries": len(cache)}

    def describe(self) -> dict:
        return {"backend": self.name, "dir": self.directory, "max_mb": self.max_bytes // 2 ** 20, "ttl": self.ttl}


class RedisBackend:
    """A Redis server (``redis://``, ``rediss://`` or ``unix://`` URL) with short socket timeouts and no retries;
    entries get a TTL and Redis' own ``maxmemory`` / eviction policy bounds its memory."""

    name = "redis"
    PREFIX = "cosyvoice-lite:audio:"

    def __init__(self, url: str, ttl: int = 0, timeout: float = REDIS_TIMEOUT):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.ttl = ttl
        # the pool reconnects lazily and checks the pid, so one client serves every thread and forked worker
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                            retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                                            health_check_interval=0)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return self._client.mget([self.PREFIX + key for key in keys]) if keys else []

    def put(self, key: str, value: bytes) -> int:
        self._client.set(self.PREFIX + key, value, ex=self.ttl or None)
        return 0  # Redis evicts by itself (maxmemory-policy); its count is in stats()

    def delete(self, key: str) -> None:
        self._client.delete(self.PREFIX + key)

    def stats(self) -> dict:
        info = self._client.info("stats")
        return {"evictions": int(info.get("evicted_keys", 0))}

    def describe(self) -> dict:
        return {"backend": self.name, "url": redact(self.url), "ttl": self.ttl}


def redact(url: str) -> str:
    """The URL without its password (``/ready`` is public)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))
