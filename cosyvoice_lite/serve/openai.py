"""What the OpenAI-compatible routes add: the model list of /v1/models and the server-sent events of
``stream_format: "sse"``. (OpenAI's voice names are in voices/book.py, its request fields in schema.py.)"""
from __future__ import annotations

import base64
import json

from .. import audio
from ..engines import Engine

# The `model` values this service answers to: its own id first, then OpenAI's speech models (all served by the
# one engine, so that clients configured for OpenAI work unchanged).
OPENAI_MODEL_IDS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


def model_ids(engine: Engine) -> list[str]:
    return [engine.model_id, *OPENAI_MODEL_IDS]


def model_object(model_id: str, created: int) -> dict:
    """An OpenAI Model object; ``created`` is when this service loaded its engine (Unix seconds)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "cosyvoice-lite"}


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
