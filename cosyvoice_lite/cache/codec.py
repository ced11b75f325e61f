"""How a cached segment is stored: 16-bit PCM at 24 kHz behind a small header that lets a reader detect a truncated
or damaged entry (length and CRC-32 of the samples) instead of playing noise.

The float audio an engine yields is rounded to 16 bits exactly as the encoders do it (``audio.to_pcm16``), so a
segment served from the cache encodes to the same bytes as the one that was synthesised.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

MAGIC = b"CVLA"
VERSION = 1
RATE = 24000
_HEADER = struct.Struct("<4sHIII")  # magic, version, sample rate, samples, crc32 of the sample bytes
SCALE = 32767.0


class CorruptEntry(ValueError):
    """Bytes that are not a whole, intact cache entry."""


def quantize(audio: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16, rounded like audio.to_pcm16."""
    scaled = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * np.float32(SCALE)
    return np.rint(scaled).astype(np.int16)


def dequantize(pcm: np.ndarray) -> np.ndarray:
    """int16 -> float32 that audio.to_pcm16 turns back into the same int16."""
    return pcm.astype(np.float32) / np.float32(SCALE)


def pack(pcm: np.ndarray) -> bytes:
    data = np.ascontiguousarray(pcm, dtype="<i2").tobytes()
    return _HEADER.pack(MAGIC, VERSION, RATE, len(data) // 2, zlib.crc32(data)) + data


def unpack(blob: bytes) -> np.ndarray:
    """Entry bytes -> int16 samples; raises CorruptEntry for anything but an intact entry of this version."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < _HEADER.size:
        raise CorruptEntry("shorter than its header")
    magic, version, rate, samples, crc = _HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION or rate != RATE:
        raise CorruptEntry("unknown header")
    data = bytes(blob[_HEADER.size:])
    if len(data) != 2 * samples:
        raise CorruptEntry(f"{len(data)} sample bytes, header says {2 * samples}")
    if zlib.crc32(data) != crc:
        raise CorruptEntry("checksum mismatch")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)
