"""Saved voices: made once from a reference clip, kept across restarts and shared by every worker — on disk under
CACHE_DIR/voices (one machine), or in Redis when CACHE is a redis:// URL (every pod).

A voice is stored as plain arrays (numpy's .npz, read with allow_pickle=False: nothing a client sent is ever
unpickled) behind a format line and a sha256 of the arrays, so a damaged or foreign entry is refused, not half-read.
Ids are made here ('voice_' + 16 hex digits): no path or key ever comes from a client.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np

from .voice import CLONED, Voice

FORMAT = b"cosyvoice-lite-voice 1\n"
ID_PATTERN = re.compile(r"^voice_[0-9a-f]{16}$")
ARRAYS = ("llm_embedding", "flow_embedding", "prompt_text", "prompt_speech", "prompt_mel")


class StoreError(RuntimeError):
    """The store cannot be read or written (disk, Redis): the message is for the server log and a 503."""


class CorruptVoice(ValueError):
    pass


def new_id() -> str:
    return "voice_" + secrets.token_hex(8)


def pack(voice: Voice, meta: dict) -> bytes:
    arrays = {name: getattr(voice, name) for name in ARRAYS if getattr(voice, name) is not None}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    body = buffer.getvalue()
    head = json.dumps({**meta, "id": voice.id, "name": voice.name, "language": voice.language,
                       "engine": voice.engine, "sha256": hashlib.sha256(body).hexdigest()}, ensure_ascii=False)
    return FORMAT + head.encode("utf-8") + b"\n" + body


def unpack(blob: bytes) -> tuple[Voice, dict]:
    if not blob.startswith(FORMAT):
        raise CorruptVoice("not a saved voice of this version")
    head, sep, body = blob[len(FORMAT):].partition(b"\n")
    try:
        meta = json.loads(head.decode("utf-8"))
    except ValueError:
        raise CorruptVoice("unreadable header") from None
    if not sep or hashlib.sha256(body).hexdigest() != meta.get("sha256"):
        raise CorruptVoice("checksum mismatch")
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as arrays:
            values = {name: arrays[name] for name in ARRAYS if name in arrays.files}
    except (ValueError, OSError) as e:
        raise CorruptVoice(f"unreadable arrays ({e})") from None
    voice = Voice(meta["id"], meta.get("name") or meta["id"], meta.get("language", "und"),
                  meta.get("engine", "cosyvoice"), CLONED, **values)
    return voice, meta


class DiskVoices:
    name = "disk"

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def _path(self, voice_id: str) -> Path:
        return self.directory / f"{voice_id}.voice"

    def get(self, voice_id: str) -> bytes | None:
        try:
            return self._path(voice_id).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read {self._path(voice_id)}: {e.strerror or e}") from None

    def put(self, voice_id: str, blob: bytes) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # written whole under another name, then renamed: a reader never sees half a voice
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self._path(voice_id))
        except OSError as e:
            raise StoreError(f"cannot write to {self.directory}: {e.strerror or e}") from None

    def delete(self, voice_id: str) -> bool:
        try:
            self._path(voice_id).unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreError(f"cannot delete from {self.directory}: {e.strerror or e}") from None

    def ids(self) -> list[str]:
        try:
            paths = sorted(self.directory.glob("voice_*.voice"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return []
        return [p.stem for p in paths if ID_PATTERN.match(p.stem)]


class RedisVoices:
    name = "redis"
    PREFIX = "cosyvoice-lite:voice:"
    INDEX = "cosyvoice-lite:voices"  # sorted set: id -> creation time

    def __init__(self, url: str):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    def _call(self, fn, *args):
        import redis

        try:
            return fn(*args)
        except redis.RedisError as e:
            raise StoreError(f"Redis: {type(e).__name__}: {e}") from None

    def get(self, voice_id: str) -> bytes | None:
        return self._call(self.client.get, self.PREFIX + voice_id)

    def put(self, voice_id: str, blob: bytes) -> None:
        def write():
            with self.client.pipeline() as pipe:
                pipe.set(self.PREFIX + voice_id, blob)
                pipe.zadd(self.INDEX, {voice_id: time.time()})
                pipe.execute()
        self._call(write)

    def delete(self, voice_id: str) -> bool:
        def remove():
            with self.client.pipeline() as pipe:
                pipe.delete(self.PREFIX + voice_id)
                pipe.zrem(self.INDEX, voice_id)
                return bool(pipe.execute()[0])
        return self._call(remove)

    def ids(self) -> list[str]:
        return [i.decode() for i in self._call(self.client.zrange, self.INDEX, 0, -1) if ID_PATTERN.match(i.decode())]


class VoiceStore:
    """Saved voices by id, over a disk or Redis backend; at most ``limit`` of them."""

    def __init__(self, backend, limit: int):
        self.backend = backend
        self.limit = limit

    @classmethod
    def open(cls, cache_setting: str, cache_root: str, limit: int) -> "VoiceStore":
        """Where the audio cache lives, the voices live too: Redis for a redis:// CACHE, else the disk."""
        setting = cache_setting.strip()
        if setting.startswith(("redis://", "rediss://", "unix://")):
            return cls(RedisVoices(setting), limit)
        return cls(DiskVoices(os.path.join(cache_root, "voices")), limit)

    def get(self, voice_id: str) -> tuple[Voice, dict] | None:
        if not ID_PATTERN.match(voice_id):
            return None
        blob = self.backend.get(voice_id)
        return None if blob is None else unpack(blob)

    def ids(self) -> list[str]:
        return self.backend.ids()

    def full(self) -> bool:
        return len(self.ids()) >= self.limit

    def put(self, voice: Voice, meta: dict) -> None:
        self.backend.put(voice.id, pack(voice, meta))

    def delete(self, voice_id: str) -> bool:
        return ID_PATTERN.match(voice_id) is not None and self.backend.delete(voice_id)
