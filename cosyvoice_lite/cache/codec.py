"""How a cached segment is stored: 16-bit PCM at 24 kHz behind a small header that lets a reader detect a truncated
or damaged entry (length and CRC-32 of the samples) instead of playing noise.

The float audio an engine yields is rounded to 16 bits by the encoders' own rounding (``audio.quantize``), so a
segment served from the cache encodes to the same bytes as the one that was synthesised.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

from ..audio import SAMPLE_RATE, dequantize, quantize  # noqa: F401  (quantize/dequantize: re-exported by cache)

MAGIC = b"CVLA"
VERSION = 1
# the rate is in each entry's header: entries written at another output rate read as unknown, not as audio
_HEADER = struct.Struct("<4sHIII")  # magic, version, sample rate, samples, crc32 of the sample bytes


class CorruptEntry(ValueError):
    """Bytes that are not a whole, intact cache entry."""


def pack(pcm: np.ndarray) -> bytes:
    data = np.ascontiguousarray(pcm, dtype="<i2").tobytes()
    return _HEADER.pack(MAGIC, VERSION, SAMPLE_RATE, len(data) // 2, zlib.crc32(data)) + data


def unpack(blob: bytes) -> np.ndarray:
    """Entry bytes -> int16 samples; raises CorruptEntry for anything but an intact entry of this version."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < _HEADER.size:
        raise CorruptEntry("shorter than its header")
    magic, version, rate, samples, crc = _HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION or rate != SAMPLE_RATE:
        raise CorruptEntry("unknown header")
    data = bytes(blob[_HEADER.size:])
    if len(data) != 2 * samples:
        raise CorruptEntry(f"{len(data)} sample bytes, header says {2 * samples}")
    if zlib.crc32(data) != crc:
        raise CorruptEntry("checksum mismatch")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)
