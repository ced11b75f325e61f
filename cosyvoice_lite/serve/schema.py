"""The speech request: fields, defaults and limits of both routes (/tts and /v1/audio/speech), checked in one place."""
from __future__ import annotations

import math

from .. import audio
from ..service import SynthesisRequest, SynthesisService, clean_text
from .errors import ApiError

SPEED_RANGE = (0.25, 4.0)
SEED_MAX = 2**63 - 1
MAX_INSTRUCTIONS_CHARS = 1000


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


def parse_speech_request(body: dict, service: SynthesisService, *, text_key: str, speaker_key: str,
                         format_key: str, default_format: str, default_stream: bool = False,
                         mapped_names: bool = True) -> SynthesisRequest:
    """``mapped_names``: the voice may also be one of the OpenAI voice names (VOICE_MAP). Streaming by default
    (``default_stream``) applies to the streamable formats only; the others are sent whole unless ``stream`` is
    asked for."""
    settings = service.settings
    voices = service.voices
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
        voice = voices.default
    else:
        voice = service.find_voice(name, mapped=mapped_names) if isinstance(name, str) else None
        if voice is None:
            listing = ", ".join([voices.names_listing()] + (list(voices.mapped) if mapped_names else []))
            problem = f"unknown {speaker_key} {repr(name)[:80]}" if isinstance(name, str) \
                else f"'{speaker_key}' must be a string"
            raise ApiError(400, f"{problem}; choose one of: {listing}", code="unknown_speaker",
                           param=speaker_key, valid_speakers=[{"id": v.id, "alias": v.name} for v in voices.voices])

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
    instructions = optional(body, "instructions", "")
    if not isinstance(instructions, str):
        raise ApiError(400, "'instructions' must be a string", code="invalid_instructions", param="instructions")
    if len(instructions) > MAX_INSTRUCTIONS_CHARS:
        raise ApiError(400, f"'instructions' has {len(instructions)} characters; the limit is "
                       f"{MAX_INSTRUCTIONS_CHARS}", code="instructions_too_long", param="instructions")
    return SynthesisRequest(text, voice, speed, fmt, stream, cache=cache, seed=seed, normalize=normalize,
                            instructions=instructions)
