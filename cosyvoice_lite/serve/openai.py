"""What the OpenAI-compatible routes add: OpenAI voice names mapped to speakers (VOICE_MAP), the model list of
/v1/models, and the server-sent events of ``stream_format: "sse"``."""
from __future__ import annotations

import base64
import json
import logging

from .. import audio
from ..engines import Engine, Speaker, StartupError
from .errors import ApiError
from .schema import optional
from ..settings import parse_voice_map

log = logging.getLogger("cosyvoice_lite")

# OpenAI's built-in voices -> CosyVoice-300M-SFT speakers, by the voices' character (female / male). OpenAI's voices
# are English voices, so are these speakers; Chinese text wants VOICE_MAP=alloy=zh-female,... (or voice=zh-female).
DEFAULT_VOICE_MAP = {
    "alloy": "en-female", "ash": "en-male", "ballad": "en-male", "coral": "en-female", "echo": "en-male",
    "fable": "en-male", "nova": "en-female", "onyx": "en-male", "sage": "en-female", "shimmer": "en-female",
    "verse": "en-male", "marin": "en-female", "cedar": "en-male",
}

# The `model` values this service answers to: its own id first, then OpenAI's speech models (all served by the
# one engine, so that clients configured for OpenAI work unchanged).
OPENAI_MODEL_IDS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


class VoiceTable:
    """Voice names of the OpenAI route: the engine's speakers (id or alias) and the VOICE_MAP names.

    VOICE_MAP entries are laid over DEFAULT_VOICE_MAP. A target the engine does not have is a start-up error,
    except on the offline voice, which has one speaker: there every name maps to it (logged), so that a VOICE_MAP
    written for CosyVoice does not stop the fallback from starting."""

    def __init__(self, engine: Engine, voice_map: str):
        self.engine = engine
        default = engine.speakers()[0]
        user = parse_voice_map(voice_map)
        self.mapped: dict[str, Speaker] = {}
        for name in user:
            if engine.resolve_speaker(name) is not None:
                raise StartupError(f"VOICE_MAP name {name!r} is already a speaker of the {engine.name} engine; "
                                   "choose another name")
        for name, target in {**DEFAULT_VOICE_MAP, **user}.items():
            speaker = engine.resolve_speaker(target)
            if speaker is None:
                if name in user and engine.name != "piper":
                    valid = ", ".join(f"{s.id} ({s.alias})" for s in engine.speakers())
                    raise StartupError(f"VOICE_MAP maps {name!r} to {target!r}, which is not a speaker of the "
                                       f"{engine.name} engine; choose one of: {valid}")
                if name in user or engine.name != "piper":  # the offline voice has one speaker: no news
                    log.info("voice %s: the %s engine has no speaker %s; %s speaks it", name, engine.name, target,
                             default.alias)
                speaker = default
            self.mapped[name] = speaker

    def resolve(self, name: str) -> Speaker | None:
        """A speaker id or alias first (so a VOICE_MAP name never hides a speaker), then a mapped voice name."""
        return self.engine.resolve_speaker(name) or self.mapped.get(name.strip().lower())

    def names(self) -> list[str]:
        return list(self.mapped)

    def listing(self) -> list[dict]:
        """/v1/audio/voices: the speakers, then the mapped names with the speaker each one speaks with."""
        voices = [{"id": s.alias, "name": s.id, "language": s.language, "speaker": s.alias}
                  for s in self.engine.speakers()]
        voices += [{"id": name, "name": f"{name} ({s.alias})", "language": s.language, "speaker": s.alias}
                   for name, s in self.mapped.items()]
        return voices


def engine_model_id(engine: Engine) -> str:
    return {"cosyvoice": "cosyvoice-300m-sft", "piper": "piper-en_US-joe-medium"}.get(engine.name, engine.name)


def model_ids(engine: Engine) -> list[str]:
    return [engine_model_id(engine), *OPENAI_MODEL_IDS]


def model_object(model_id: str, created: int) -> dict:
    """An OpenAI Model object; ``created`` is when this service loaded its engine (Unix seconds)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "cosyvoice-lite"}


def openai_fields(body: dict, engine: Engine) -> tuple[dict, bool]:
    """The fields only OpenAI's request has (model, instructions, stream_format, a voice object), checked; ->
    (the body for parse_speech_request, whether the answer is server-sent events)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", code="invalid_model", param="model")
    instructions = optional(body, "instructions", "")
    if not isinstance(instructions, str):
        raise ApiError(400, "'instructions' must be a string", code="invalid_instructions", param="instructions")
    if instructions.strip():
        raise ApiError(400, f"'instructions' is not supported by this model ({engine_model_id(engine)}): its "
                       "speakers have fixed voices; leave it out and choose a voice instead",
                       code="unsupported_instructions", param="instructions")
    stream_format = optional(body, "stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise ApiError(400, "'stream_format' must be 'audio' or 'sse'", code="invalid_stream_format",
                       param="stream_format")
    voice = body.get("voice")
    if isinstance(voice, dict) and set(voice) == {"id"}:  # OpenAI's custom voice reference {"id": ...}
        body = {**body, "voice": voice["id"]}
    sse = stream_format == "sse"
    if sse and body.get("stream") is False:
        raise ApiError(400, "stream_format 'sse' streams events; leave out 'stream': false, or use "
                       "stream_format 'audio'", code="invalid_stream", param="stream")
    if sse and body.get("stream") is True:  # events stream whatever the format: no "cannot be streamed"
        body = {**body, "stream": None}
    return body, sse


class SseEncoder(audio.Encoder):
    """OpenAI's speech events around another encoder: each piece of encoded audio becomes one
    ``speech.audio.delta`` event (base64), and the end one ``speech.audio.done`` event with the usage.

    There are no billed tokens here: ``usage`` counts the input's characters as input tokens (the unit OpenAI's
    tts-1 bills) and no output tokens."""

    content_type = "text/event-stream"

    def __init__(self, inner: audio.Encoder, input_chars: int):
        self.inner = inner
        self.input_chars = input_chars

    @staticmethod
    def event(data: dict) -> bytes:
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    def _delta(self, data: bytes) -> bytes:
        if not data:
            return b""
        return self.event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})

    def start(self) -> bytes:
        return self._delta(self.inner.start())

    def encode(self, chunk) -> bytes:
        return self._delta(self.inner.encode(chunk))

    def finish(self) -> bytes:
        usage = {"input_tokens": self.input_chars, "output_tokens": 0, "total_tokens": self.input_chars}
        return self._delta(self.inner.finish()) + self.event({"type": "speech.audio.done", "usage": usage})
