"""The speech request: fields, defaults and limits of both routes (/tts and /v1/audio/speech), checked in one place."""
from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

from .. import audio
from ..engines import Speaker
from .context import Service
from .errors import ApiError

SPEED_RANGE = (0.25, 4.0)
SEED_MAX = 2**63 - 1


@dataclass
class SpeechRequest:
    text: str
    speaker: Speaker
    speed: float
    fmt: str
    stream: bool
    normalize: bool
    sse: bool = False  # OpenAI's stream_format "sse": the audio in speech.audio.delta events
    cache: bool = True  # may read and write the audio cache
    seed: int | None = None  # the same text, speaker and seed give the same audio


def optional(body: dict, key: str, default):
    """An optional field: absent or null means its default."""
    value = body.get(key)
    return default if value is None else value


def _number(value) -> float | None:
    """A finite JSON number as float, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def clean_text(text: str) -> str:
    """Control characters and lone surrogates become spaces: they cannot be spoken and break codecs."""
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in text)


def parse_speech_request(body: dict, service: Service, *, text_key: str, speaker_key: str, format_key: str,
                         default_format: str, default_stream: bool = False, resolve=None,
                         more_names: list[str] | None = None) -> SpeechRequest:
    """``resolve`` finds a speaker by name (default: the engine's ids and aliases); ``more_names`` are the names
    it knows besides those, listed in the error for an unknown one. Streaming by default (``default_stream``)
    applies to the streamable formats only; the others are sent whole unless ``stream`` is asked for."""
    settings = service.settings
    resolve = resolve or service.engine.resolve_speaker
    text = body.get(text_key)
    if text is None:
        raise ApiError(400, f"'{text_key}' is required", code="missing_text", param=text_key)
    if not isinstance(text, str):
        raise ApiError(400, f"'{text_key}' must be a string", code="invalid_text", param=text_key)
    if len(text) > settings.max_text_chars:
        raise ApiError(413, f"'{text_key}' has {len(text)} characters; the limit is {settings.max_text_chars}",
                       code="text_too_long", param=text_key, max_chars=settings.max_text_chars)
    text = clean_text(text)
    if not text.strip():
        raise ApiError(400, f"'{text_key}' is empty", code="empty_text", param=text_key)
    problem = service.engine.unreadable(text)
    if problem:
        raise ApiError(400, problem, code="unreadable_text", param=text_key, engine=service.engine.name)

    name = body.get(speaker_key)
    if name is None:
        speaker = service.default_speaker()
    else:
        speaker = resolve(name) if isinstance(name, str) else None
        if speaker is None:
            valid = service.engine.speakers()
            listing = ", ".join([f"{s.id} ({s.alias})" if s.alias != s.id else s.id for s in valid]
                                + (more_names or []))
            problem = f"unknown {speaker_key} {repr(name)[:80]}" if isinstance(name, str) \
                else f"'{speaker_key}' must be a string"
            raise ApiError(400, f"{problem}; choose one of: {listing}", code="unknown_speaker",
                           param=speaker_key, valid_speakers=[{"id": s.id, "alias": s.alias} for s in valid])

    speed = _number(optional(body, "speed", 1.0))
    if speed is None or not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise ApiError(400, f"'speed' must be a number from {SPEED_RANGE[0]} to {SPEED_RANGE[1]}", code="invalid_speed",
                       param="speed")

    fmt = optional(body, format_key, default_format)
    if fmt == "aac":
        raise ApiError(400, f"'{format_key}' aac is not available here (no AAC encoder is installed); use one of "
                       f"{', '.join(audio.FORMATS)}", code="unsupported_format", param=format_key)
    if not isinstance(fmt, str) or fmt not in audio.FORMATS:  # a list or object is not a format (nor hashable)
        raise ApiError(400, f"'{format_key}' must be one of {', '.join(audio.FORMATS)}", code="invalid_format",
                       param=format_key)
    asked = body.get("stream")
    stream = optional(body, "stream", default_stream)
    normalize = optional(body, "normalize", True)
    cache = optional(body, "cache", True)
    for key, value in (("stream", stream), ("normalize", normalize), ("cache", cache)):
        if not isinstance(value, bool):
            raise ApiError(400, f"'{key}' must be true or false", code=f"invalid_{key}", param=key)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
        raise ApiError(400, f"'seed' must be an integer from 0 to {SEED_MAX}", code="invalid_seed", param="seed")
    if stream and asked is None:
        stream = fmt in audio.STREAMABLE_FORMATS
    elif stream and fmt not in audio.STREAMABLE_FORMATS:
        raise ApiError(400, f"{fmt} cannot be streamed; stream one of {', '.join(audio.STREAMABLE_FORMATS)}",
                       code="invalid_format", param=format_key)
    return SpeechRequest(text, speaker, speed, fmt, stream, normalize, cache=cache, seed=seed)
