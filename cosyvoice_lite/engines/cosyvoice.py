"""CosyVoice-300M-SFT as an engine: text frontend -> token ids -> the scheduler (batched LLM steps, streamed flow
and HiFT chunks) -> 24 kHz audio."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import soxr
import torch

from ..backends import accelerate
from ..decode.scheduler import Scheduler
from ..frontend import NothingToSpeak, TextFrontend
from ..memory import configure_process
from ..model import load_model
from ..model.speed import settings
from .base import OUTPUT_RATE, Engine, Speaker, SynthesisError

# Speech tokens in the first streamed chunk of a request besides its overlap (then 100, growing to 200). TokenStream
# raises it to the smallest hop that leaves HiFT enough frames.
FIRST_HOP = 1


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
    COSYVOICE_MODE environment variable, else 'default'). Concurrent ``synthesize`` calls (one per request
    thread) go straight to one scheduler thread that decodes ``max_batch`` of them side by side, the rest wait.
    """

    name = "cosyvoice"

    def __init__(self, model_dir, n_timesteps: int | None = None, mode: str | None = None, max_batch: int = 4,
                 first_hop: int | None = FIRST_HOP, threads: int | None = None, backend: str = "auto",
                 cache_root: str | None = None):
        configure_process(threads)
        self.mode = settings(mode)
        self.model = load_model(model_dir, mode=self.mode.name)
        # backend: 'auto' | 'openvino' | 'torch' (backends.plan); cache_root: where compiled models are kept
        self.runtime = accelerate(self.model, self.mode, model_dir, backend=backend, cache_root=cache_root,
                                  threads=torch.get_num_threads())
        self.frontend = TextFrontend()
        self.n_timesteps = n_timesteps or self.mode.n_timesteps
        self.max_batch = max(1, max_batch)
        self.scheduler = Scheduler(self.model, max_batch=self.max_batch, first_hop=first_hop,
                                   n_timesteps=self.n_timesteps)
        self.description = f"CosyVoice-300M-SFT from {model_dir} ({self.mode.name} mode, {self.runtime['backend']})"
        self._speakers = [Speaker(sid, *COSYVOICE_SPEAKERS.get(sid, (sid, "und")), engine=self.name)
                          for sid in self.model.speakers]

    def speakers(self) -> list[Speaker]:
        return self._speakers

    def _synthesize(self, text, speaker, speed, normalize, cancel, seed: int | None = None,
                    **sampling) -> Iterator[np.ndarray]:
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
        finally:
            chunks.close()
        tail = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        if tail.size:
            yield tail
