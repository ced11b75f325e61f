"""The loaded CosyVoice-300M model: the three networks, the speakers, and the paths through them.

Who speaks is either a speaker id of spk2info.pt (SFT) or a voice: any object with the arrays of
``voices.Voice`` (llm_embedding, flow_embedding, prompt_text, llm_prompt_speech, prompt_speech, prompt_mel), which
is how zero-shot, cross-lingual and instruct synthesis and voice conversion are conditioned.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from .modes import SETTINGS, ModeSettings


class UnknownSpeaker(KeyError):
    pass


def _float(array) -> Optional[torch.Tensor]:
    """A voice's float32 array as a tensor (None for None or empty: no speaker slot / no prompt)."""
    if array is None or np.size(array) == 0:
        return None
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _tokens(array) -> Optional[torch.Tensor]:
    """A voice's token ids as (1, n) int64, or None when there are none."""
    if array is None or np.size(array) == 0:
        return None
    return torch.from_numpy(np.asarray(array, dtype=np.int64).reshape(1, -1))


def llm_conditioning(voice) -> dict:
    """What the LLM reads of a voice, as keyword arguments of LMDecoder.start / decode.reference.generate:
    embedding (1, D) or None (instruct: no speaker slot), prompt_text (1, Lp) (transcript or instruction) and
    prompt_speech (1, Np) (the clip's tokens, zero-shot only), each None when absent."""
    return {"embedding": _float(voice.llm_embedding), "prompt_text": _tokens(voice.prompt_text),
            "prompt_speech": _tokens(voice.llm_prompt_speech)}


def flow_conditioning(voice) -> dict:
    """What the flow reads of a voice, as keyword arguments of MaskedDiffWithXvec.inference: embedding (1, D),
    prompt_token (1, Np) and prompt_feat (1, Fp, 80) (None without a clip)."""
    embedding = _float(voice.flow_embedding)
    if embedding is None:
        raise ValueError(f"voice {getattr(voice, 'id', voice)!r} has no speaker embedding for the flow")
    prompt_token, prompt_mel = _tokens(voice.prompt_speech), _float(voice.prompt_mel)
    if (prompt_token is None) != (prompt_mel is None):
        raise ValueError(f"voice {getattr(voice, 'id', voice)!r} needs both prompt speech tokens and a prompt mel "
                         "(or neither)")
    return {"embedding": embedding, "prompt_token": prompt_token,
            "prompt_feat": None if prompt_mel is None else prompt_mel.reshape(1, -1, prompt_mel.shape[-1])}


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

    def llm_inputs(self, speaker) -> dict:
        """LLM conditioning of a speaker id or a voice (see llm_conditioning)."""
        if isinstance(speaker, str):
            return {"embedding": self.embedding(speaker)}
        return llm_conditioning(speaker)

    def flow_inputs(self, speaker) -> dict:
        """Flow conditioning of a speaker id or a voice (see flow_conditioning)."""
        if isinstance(speaker, str):
            return {"embedding": self.embedding(speaker)}
        return flow_conditioning(speaker)

    @torch.inference_mode()
    def tokens_to_mel(self, speech_token: Sequence[int] | torch.Tensor, speaker, n_timesteps: int | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """(1, 80, F) mel for T speech tokens, F = int(T / 50 * 22050 / 256); n_timesteps defaults to the mode's.
        A voice with a clip makes it a continuation of the clip's mel (noise, if given, spans Fp + F frames)."""
        token = torch.as_tensor(speech_token, dtype=torch.int64).reshape(1, -1)
        return self.flow.inference(token, n_timesteps=n_timesteps or self.n_timesteps, noise=noise,
                                   **self.flow_inputs(speaker))

    @torch.inference_mode()
    def mel_to_wav(self, mel: torch.Tensor) -> torch.Tensor:
        """(1, F * 256) float32 waveform in [-0.99, 0.99] at ``sample_rate``."""
        wav, _ = self.hift(mel)
        return wav
