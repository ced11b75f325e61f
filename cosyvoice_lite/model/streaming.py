"""Speech tokens -> waveform in chunks while the LLM is still decoding, the way official CosyVoice v1 streams.

Every chunk runs the flow on ``hop + 20`` tokens: the last 20 tokens (34 mel frames) overlap the next chunk, which
starts from the same noise and mu for them (the flow cache) and cross-fades its first 34 frames with them (Hamming
window). HiFT sees the previous chunk's last 20 mel frames again (its excitation is copied over for the first
20 * 256 samples) and the speech of those frames is cross-faded too, so the chunks join without clicks; the last
20 * 256 samples of each chunk are held back for that fade. The hop starts small (``first_hop``, for a short first
wait), then is 100 tokens and doubles up to 200, as larger chunks waste less on overlaps.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

TOKEN_OVERLAP = 20        # tokens shared by consecutive flow chunks (official token_overlap_len)
HIFT_CACHE_FRAMES = 20    # mel frames HiFT sees twice (official mel_cache_len)


def crossfade(head: torch.Tensor, tail: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Fade the first n = len(window) // 2 samples of `head` in over the last n of `tail` (fading out)."""
    n = window.numel() // 2
    head = head.clone()
    mixed = head[..., :n].double() * window[:n] + tail[..., -n:].double() * window[n:]
    head[..., :n] = mixed.to(head.dtype)
    return head


class TokenStream:
    """Collects one segment's speech tokens and turns them into waveform chunks (1, S) at the model's rate."""

    def __init__(self, model, speaker: str, n_timesteps: Optional[int] = None, speed: float = 1.0,
                 generator: Optional[torch.Generator] = None, first_hop: Optional[int] = None,
                 hop: Optional[int] = None, max_hop: Optional[int] = None):
        self.model = model
        self.embedding = model.embedding(speaker)
        self.n_timesteps = n_timesteps or model.n_timesteps
        self.speed = speed
        self.generator = generator
        rate = model.token_rate
        self.min_hop = hop or 2 * rate                     # official token_min_hop_len (100)
        self.max_hop = max_hop or 4 * rate                 # official token_max_hop_len (200)
        self.hop = first_hop or self.min_hop
        self.mel_overlap = model.flow.n_frames(TOKEN_OVERLAP)                 # 34 frames
        self.mel_window = torch.from_numpy(np.hamming(2 * self.mel_overlap))
        self.source_cache = HIFT_CACHE_FRAMES * model.samples_per_frame      # 5120 samples
        self.speech_window = torch.from_numpy(np.hamming(2 * self.source_cache))
        self.tokens: List[int] = []
        self.flow_cache = torch.zeros(1, 80, 0, 2)
        self.mel_tail: Optional[torch.Tensor] = None       # last mel_overlap frames of the previous chunk
        self.hift_cache: Optional[dict] = None
        self.chunks = 0

    def push(self, token: int) -> None:
        self.tokens.append(token)

    def ready(self) -> bool:
        """Enough tokens for the next (non-final) chunk."""
        return len(self.tokens) >= self.hop + TOKEN_OVERLAP

    @torch.inference_mode()
    def chunk(self) -> torch.Tensor:
        """The next non-final chunk (call when ready()): consumes `hop` tokens."""
        wav = self._vocode(self.tokens[:self.hop + TOKEN_OVERLAP], final=False)
        self.tokens = self.tokens[self.hop:]
        self.hop = self.min_hop if self.chunks == 1 else min(self.max_hop, 2 * self.hop)
        return wav

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """The last chunk: every token left, nothing held back."""
        if not self.tokens:
            if self.hift_cache is None:
                return torch.zeros(1, 0)
            return self.hift_cache["speech"]  # the held-back tail (no more tokens to fade into)
        wav = self._vocode(self.tokens, final=True)
        self.tokens = []
        return wav

    def _vocode(self, tokens: List[int], final: bool) -> torch.Tensor:
        model = self.model
        token = torch.tensor(tokens, dtype=torch.int64).reshape(1, -1)
        mel, self.flow_cache = model.flow.inference_chunk(token, self.embedding, self.n_timesteps,
                                                          cache=self.flow_cache, generator=self.generator)
        if self.mel_tail is not None:
            mel = crossfade(mel, self.mel_tail, self.mel_window)
        if not final:
            self.mel_tail = mel[:, :, -self.mel_overlap:]
            mel = mel[:, :, :-self.mel_overlap]
        if self.speed != 1.0:
            mel = F.interpolate(mel, size=max(1, int(mel.shape[2] / self.speed)), mode="linear")
        if self.hift_cache is not None:
            mel = torch.cat([self.hift_cache["mel"], mel], dim=2)
            cache_source = self.hift_cache["source"]
        else:
            cache_source = torch.zeros(1, 1, 0)
        speech, source = model.hift(mel, cache_source, generator=self.generator)
        if self.hift_cache is not None:
            speech = crossfade(speech, self.hift_cache["speech"], self.speech_window)
        self.chunks += 1
        if final:
            return speech
        self.hift_cache = {"mel": mel[:, :, -HIFT_CACHE_FRAMES:], "source": source[:, :, -self.source_cache:],
                           "speech": speech[:, -self.source_cache:]}
        return speech[:, :-self.source_cache]
