"""Text + speaker -> audio. The service talks to an ``Engine``; two exist:

- ``CosyVoiceEngine``: the product — text frontend + CosyVoice-300M-SFT (LLM, flow, HiFT) on the CPU.
- ``PiperEngine`` (cosyvoice_lite/offline_voice.py): a small English fallback so that a box with no CosyVoice
  checkpoint still starts and speaks.

Both yield float32 mono chunks at ``OUTPUT_RATE`` so that the server can stream them as they come.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .memory import map_large_blocks

OUTPUT_RATE = 24000
# Speech tokens in the first streamed chunk of a request besides its overlap (then 100, growing to 200). TokenStream
# raises it to the smallest hop that leaves HiFT enough frames: 23 at normal tempo with the official 20-token join
# (~0.23 s of audio), 12 with fast mode's 10-token first join (~0.12 s).
FIRST_HOP = 1


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


# Readable aliases and languages for the speaker ids that CosyVoice-300M-SFT ships.
COSYVOICE_SPEAKERS = {
    "中文女": ("zh-female", "zh"),
    "中文男": ("zh-male", "zh"),
    "日语男": ("ja-male", "ja"),
    "粤语女": ("yue-female", "yue"),
    "英文女": ("en-female", "en"),
    "英文男": ("en-male", "en"),
    "韩语女": ("ko-female", "ko"),
}


class CosyVoiceEngine(Engine):
    """CosyVoice-300M-SFT on the CPU, streamed: each text segment goes LLM -> flow -> HiFT in chunks (official v1
    streaming: the first audio comes after a few dozen speech tokens, not at the end of the segment), resampled
    22050 -> 24000 Hz with one continuous soxr stream per request (no seams between chunks).

    ``mode`` is a speed mode of ``cosyvoice_lite.model.speed`` ('exact', 'default', 'fast'; None -> the
    COSYVOICE_MODE environment variable, else 'default'). Concurrent ``synthesize`` calls (from several threads)
    share one scheduler thread that batches their LLM steps (``max_batch`` requests at a time, the rest wait).
    """

    name = "cosyvoice"

    def __init__(self, model_dir, n_timesteps: int | None = None, mode: str | None = None, max_batch: int = 4,
                 first_hop: int | None = FIRST_HOP, threads: int | None = None):
        import torch

        from .frontend import TextFrontend
        from .model import load_model
        from .model.scheduler import Scheduler
        from .model.speed import settings

        if threads:
            torch.set_num_threads(threads)
        # oneDNN keeps compiled kernels for every convolution shape it has seen (1024 by default); streamed chunks
        # come in many lengths, so a long-running worker would keep growing. 64 costs no measurable speed here.
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
        map_large_blocks()  # large activations go back to the OS when freed (see memory.py)
        self.mode = settings(mode)
        self.model = load_model(model_dir, mode=self.mode.name)
        self.frontend = TextFrontend()
        self.n_timesteps = n_timesteps or self.mode.n_timesteps
        self.scheduler = Scheduler(self.model, max_batch=max_batch, first_hop=first_hop, n_timesteps=self.n_timesteps)
        self.description = f"CosyVoice-300M-SFT from {model_dir} ({self.mode.name} mode)"
        self._speakers = [Speaker(sid, *COSYVOICE_SPEAKERS.get(sid, (sid, "und")), engine=self.name)
                          for sid in self.model.speakers]

    def speakers(self) -> list[Speaker]:
        return self._speakers

    def _synthesize(self, text, speaker, speed, normalize, cancel, seed: int | None = None,
                    **sampling) -> Iterator[np.ndarray]:
        import soxr

        from .frontend import NothingToSpeak
        from .model.scheduler import Cancelled as SchedulerCancelled

        try:
            segments = self.frontend.segments_or_raise(text, normalize)
        except NothingToSpeak as error:
            raise SynthesisError(str(error)) from None
        tokens = [self.frontend.tokenize(segment) for segment in segments]
        tokens = [t for t in tokens if len(t)]
        if not tokens:
            raise SynthesisError("nothing to speak")
        resampler = soxr.ResampleStream(self.model.sample_rate, OUTPUT_RATE, 1, dtype="float32", quality="HQ")
        chunks = self.scheduler.submit(tokens, speaker.id, speed=speed, cancel=cancel, seed=seed, **sampling)
        try:
            for wav in chunks:
                chunk = resampler.resample_chunk(wav)
                if chunk.size:
                    yield chunk
        except SchedulerCancelled:
            raise Cancelled() from None
        finally:
            chunks.close()
        tail = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        if tail.size:
            yield tail
