"""Text + speaker -> audio. The service talks to an ``Engine``; two exist:

- ``CosyVoiceEngine``: the product — text frontend + CosyVoice-300M-SFT (LLM, flow, HiFT) on the CPU.
- ``PiperEngine`` (cosyvoice_lite/offline_voice.py): a small English fallback so that a box with no CosyVoice
  checkpoint still starts and speaks.

Both yield float32 mono chunks at ``OUTPUT_RATE`` so that the server can stream them as they come.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

OUTPUT_RATE = 24000


class SynthesisError(ValueError):
    """The request cannot be spoken (the message is safe to show to the client)."""


class Cancelled(Exception):
    """Synthesis stopped because the client went away or the request timed out."""


@dataclass(frozen=True)
class Speaker:
    id: str          # the model's own id, e.g. '中文女'
    alias: str       # readable ASCII alias, e.g. 'zh-female'
    language: str    # BCP-47-ish language tag, e.g. 'zh', 'en', 'ja', 'yue', 'ko'
    engine: str      # 'cosyvoice' or 'piper'


class Engine:
    """Common interface. Subclasses set ``name`` and implement ``speakers`` and ``_synthesize``."""

    name = "engine"
    description = ""

    def speakers(self) -> list[Speaker]:
        raise NotImplementedError

    def resolve_speaker(self, name: str) -> Speaker | None:
        """Find a speaker by id or alias (aliases match case-insensitively)."""
        for speaker in self.speakers():
            if name == speaker.id or name.strip().lower() == speaker.alias.lower():
                return speaker
        return None

    def synthesize(self, text: str, speaker: Speaker, speed: float = 1.0, normalize: bool = True,
                   cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        """Yield float32 mono chunks at OUTPUT_RATE; raise SynthesisError for text with nothing to speak and
        Cancelled as soon as ``cancel`` is set."""
        for chunk in self._synthesize(text, speaker, speed, normalize, cancel):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            yield chunk

    def _synthesize(self, text, speaker, speed, normalize, cancel) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def warmup(self) -> None:
        """Run one short synthesis so that the first real request is not slow."""
        speaker = self.speakers()[0]
        for _ in self.synthesize("Hello.", speaker):
            pass
