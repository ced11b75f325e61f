"""Reading Wyoming frames with bounds: ``{"type", "version", "data_length"?, "payload_length"?}\\n``, then
``data_length`` bytes of JSON data, then ``payload_length`` bytes of payload.

The wyoming library's own reader trusts the lengths it is sent and waits forever; a server on a network must not:
every length has a ceiling, a started frame must arrive whole within a time limit, and anything malformed is a
FrameError, after which the connection is closed (its framing can no longer be trusted).
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from wyoming.event import Event

MAX_HEADER_BYTES = 16 * 1024     # a header line is ~100 bytes; this is also the StreamReader's buffer limit
MAX_PAYLOAD_BYTES = 256 * 1024   # a TTS server is sent no audio; a payload is read and dropped, within this bound


class FrameError(Exception):
    """The peer broke the framing (the message says how); the connection is closed."""


@dataclass
class Limits:
    max_data: int             # bytes of JSON data (a synthesize event's text: MAX_TEXT_CHARS, escaped)
    frame_timeout: float      # seconds a frame may take to arrive once its first byte is in
    idle_timeout: float       # seconds the connection may stay silent between frames

    @classmethod
    def for_text(cls, max_text_chars: int, frame_timeout: float, idle_timeout: float) -> "Limits":
        # JSON may escape each character as \\uXXXX\\uXXXX (12 bytes); plus room for the voice and context
        return cls(12 * max_text_chars + 64 * 1024, frame_timeout, idle_timeout)


async def read_frame(reader: asyncio.StreamReader, limits: Limits, idle_timeout: float | None) -> Event | None:
    """The next event, or None at the end of the stream. ``idle_timeout``: how long to wait for a frame to begin
    (None: as long as it takes). Raises FrameError, or TimeoutError for a silent or slow peer."""
    first = await asyncio.wait_for(reader.read(1), idle_timeout) if idle_timeout else await reader.read(1)
    if not first:
        return None
    return await asyncio.wait_for(_rest_of_frame(reader, first, limits), limits.frame_timeout)


async def _rest_of_frame(reader: asyncio.StreamReader, first: bytes, limits: Limits) -> Event:
    try:
        line = first + await reader.readuntil(b"\n") if first != b"\n" else first
    except asyncio.LimitOverrunError:
        raise FrameError(f"header line longer than {MAX_HEADER_BYTES} bytes") from None
    except asyncio.IncompleteReadError:
        raise FrameError("connection closed inside a header") from None
    header = _json_object(line, "header")
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise FrameError("header without a 'type'")
    data_length = _length(header, "data_length", limits.max_data)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise FrameError("'data' in the header is not an object")
    try:
        if data_length:
            data = {**data, **_json_object(await reader.readexactly(data_length), "data")}
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        raise FrameError("connection closed inside a frame") from None
    return Event(type=kind, data=data, payload=payload)


def _json_object(raw: bytes, what: str) -> dict:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise FrameError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise FrameError(f"{what} is not a JSON object")
    return value


def _length(header: dict, key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FrameError(f"'{key}' is not a length")
    if value > limit:
        raise FrameError(f"'{key}' {value} is over the limit of {limit} bytes")
    return value
