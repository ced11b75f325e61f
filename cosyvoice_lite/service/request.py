"""One synthesis request, as every front door (HTTP /tts, OpenAI's /v1/audio/speech, the CLI, Wyoming) makes it and
passes it down unchanged."""
from __future__ import annotations

from dataclasses import dataclass

from ..voices import Voice


@dataclass
class SynthesisRequest:
    text: str
    voice: Voice
    speed: float = 1.0          # tempo, 0.25..4
    format: str = "wav"         # audio.FORMATS key; the front door encodes
    stream: bool = False        # audio as it is made (chunked) rather than whole
    sse: bool = False           # OpenAI's stream_format "sse": the audio in speech.audio.delta events
    seed: int | None = None     # the same text, voice and seed give the same audio (bypasses the audio cache)
    cache: bool = True          # may read and write the audio cache
    normalize: bool = True      # text normalisation (numbers, symbols) before tokenizing
    instructions: str = ""      # how to speak (CosyVoice-300M-Instruct)
    source: bytes | None = None  # voice conversion: the clip whose speech is said again in ``voice`` (no text)
    id: str = ""                # request id, for logs
