"""The loaded CosyVoice-300M-SFT model: the three networks, the speakers, and the SFT path through them."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from .modes import SETTINGS, ModeSettings


class UnknownSpeaker(KeyError):
    pass


class CosyVoiceSFT:
    """text tokens -> speech tokens (``llm``) -> mel (``flow``) -> 22050 Hz waveform (``hift``).

    Each stage is exposed on its own so that tests and tools can check them one by one; decoding speech tokens
    is decode/'s work (``decode.reference`` runs the whole path for one segment, the scheduler streams).
    """

    def __init__(self, llm, flow, hift, speakers: dict[str, torch.Tensor], sample_rate: int = 22050,
                 model_dir: Path | None = None, mode: ModeSettings | None = None, external: tuple = ()):
        self.llm, self.flow, self.hift = llm, flow, hift
        self.speakers = speakers
        self.sample_rate = sample_rate
        self.model_dir = model_dir
        self.token_rate = flow.input_frame_rate          # speech tokens per second (50)
        self.samples_per_frame = hift.upsample_factor     # waveform samples per mel frame (256)
        # the speed mode the networks were built in (load_model builds them in it): its steps, batching, joins
        self.mode = mode or SETTINGS["exact"]
        self.external = tuple(external)  # module paths built float32 for an execution backend (Precision.external)

    @property
    def n_timesteps(self) -> int:
        return self.mode.n_timesteps

    def embedding(self, speaker: str) -> torch.Tensor:
        """(1, spk_embed_dim) raw embedding of a speaker id from spk2info.pt."""
        try:
            return self.speakers[speaker]
        except KeyError:
            raise UnknownSpeaker(f"unknown speaker {speaker!r}; known: {', '.join(self.speakers)}") from None

    @torch.inference_mode()
    def tokens_to_mel(self, speech_token: Sequence[int] | torch.Tensor, speaker: str, n_timesteps: int | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """(1, 80, F) mel for T speech tokens, F = int(T / 50 * 22050 / 256); n_timesteps defaults to the mode's."""
        token = torch.as_tensor(speech_token, dtype=torch.int64).reshape(1, -1)
        return self.flow.inference(token, self.embedding(speaker), n_timesteps=n_timesteps or self.n_timesteps,
                                   noise=noise)

    @torch.inference_mode()
    def mel_to_wav(self, mel: torch.Tensor) -> torch.Tensor:
        """(1, F * 256) float32 waveform in [-0.99, 0.99] at ``sample_rate``."""
        wav, _ = self.hift(mel)
        return wav
