"""The loaded CosyVoice-300M-SFT model: the three networks, the speakers, and the SFT path through them."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from .flow import stretch
from .lm_decoder import LMDecoder
from .modes import SETTINGS, ModeSettings


class UnknownSpeaker(KeyError):
    pass


class CosyVoiceSFT:
    """text tokens -> speech tokens (``llm``) -> mel (``flow``) -> 22050 Hz waveform (``hift``).

    Each stage is exposed on its own so that tests and tools can check them one by one; ``synthesize`` runs
    the whole path in the official order of random draws (LLM sampling, flow start noise, HiFT source), so a
    seeded call reproduces the official ``inference_sft`` for one segment.
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
        self._decoder = None

    @property
    def n_timesteps(self) -> int:
        return self.mode.n_timesteps

    @property
    def decoder(self):
        """The LMDecoder for this mode (batched LM steps in the non-exact modes)."""
        if self._decoder is None:
            self._decoder = LMDecoder(self.llm, batched=self.mode.batched,
                                      kv_dtype=torch.float16 if self.mode.kv_cache == "fp16" else torch.float32)
        return self._decoder

    def embedding(self, speaker: str) -> torch.Tensor:
        """(1, spk_embed_dim) raw embedding of a speaker id from spk2info.pt."""
        try:
            return self.speakers[speaker]
        except KeyError:
            raise UnknownSpeaker(f"unknown speaker {speaker!r}; known: {', '.join(self.speakers)}") from None

    @torch.inference_mode()
    def text_to_tokens(self, text_token: Sequence[int] | torch.Tensor, speaker: str, **sampling) -> Iterator[int]:
        """Yield speech token ids one by one (KV-cached decoding); ``sampling`` overrides the LLM's length
        ratios (min_token_text_ratio, max_token_text_ratio)."""
        text = torch.as_tensor(text_token, dtype=torch.int64).reshape(1, -1)
        yield from self.decoder.tokens(self.decoder.start(text, self.embedding(speaker), **sampling))

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

    @torch.inference_mode()
    def synthesize(self, text_token: Sequence[int] | torch.Tensor, speaker: str, seed: int | None = None,
                   speed: float = 1.0, n_timesteps: int | None = None, **sampling) -> torch.Tensor:
        """Whole SFT path for one text segment -> (1, S) waveform. ``speed`` stretches the mel in time before
        the vocoder, as the official non-streaming path does."""
        if seed is not None:
            torch.manual_seed(seed)
        tokens = list(self.text_to_tokens(text_token, speaker, **sampling))
        if not tokens:
            return torch.zeros(1, 0)
        mel = self.tokens_to_mel(tokens, speaker, n_timesteps=n_timesteps)
        mel = stretch(mel, speed)
        return self.mel_to_wav(mel)
