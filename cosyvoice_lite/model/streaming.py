"""Speech tokens -> waveform in chunks while the LLM is still decoding, the way official CosyVoice v1 streams.

Every chunk runs the flow on ``hop + 20`` tokens: the last 20 tokens (34 mel frames) overlap the next chunk, which
starts from the same noise and mu for them (the flow cache) and cross-fades its first 34 frames with them (Hamming
window). HiFT sees the previous chunk's last 20 mel frames again (its excitation is copied over for the first
20 * 256 samples) and the speech of those frames is cross-faded too, so the chunks join without clicks; the last
20 * 256 samples of each chunk are held back for that fade. The hop starts small (``first_hop``, for a short first
wait), then is 100 tokens and doubles up to 200, as larger chunks waste less on overlaps.
"""
from __future__ import annotations

from typing import Callable, List, Optional

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


class Interrupted(Exception):
    """Every request of a flow batch was cancelled; the chunk was dropped halfway."""


class TokenStream:
    """Collects one segment's speech tokens and turns them into waveform chunks (1, S) at the model's rate."""

    def __init__(self, model, speaker: str, n_timesteps: Optional[int] = None, speed: float = 1.0,
                 generator: Optional[torch.Generator] = None, first_hop: Optional[int] = None,
                 hop: Optional[int] = None, max_hop: Optional[int] = None, stop: Optional[Callable[[], bool]] = None):
        self.model = model
        self.stop = stop  # polled between Euler steps: True = the listener is gone
        self.embedding = model.embedding(speaker)
        self.n_timesteps = n_timesteps or model.n_timesteps
        self.speed = speed
        self.generator = generator
        rate = model.token_rate
        self.min_hop = hop or 2 * rate                     # official token_min_hop_len (100)
        self.max_hop = max_hop or 4 * rate                 # official token_max_hop_len (200)
        self.mel_overlap = model.flow.n_frames(TOKEN_OVERLAP)                 # 34 frames
        self.hop = max(first_hop or self.min_hop, self._smallest_hop(speed))
        self.mel_window = torch.from_numpy(np.hamming(2 * self.mel_overlap))
        self.source_cache = HIFT_CACHE_FRAMES * model.samples_per_frame      # 5120 samples
        self.speech_window = torch.from_numpy(np.hamming(2 * self.source_cache))
        self.tokens: List[int] = []
        self.flow_cache = torch.zeros(1, model.flow.output_size, 0, 2)
        self.mel_tail: Optional[torch.Tensor] = None       # last mel_overlap frames of the previous chunk
        self.hift_cache: Optional[dict] = None
        self.chunks = 0

    def _smallest_hop(self, speed: float) -> int:
        """Smallest hop whose chunk still leaves 2 * HIFT_CACHE_FRAMES mel frames to vocode after the overlap is
        held back and the tempo change is applied (HiFT keeps 20 frames of each chunk for the next one)."""
        hop = 1
        while int((self.model.flow.n_frames(hop + TOKEN_OVERLAP) - self.mel_overlap) / speed) < 2 * HIFT_CACHE_FRAMES:
            hop += 1
        return hop

    def push(self, token: int) -> None:
        self.tokens.append(token)

    def ready(self) -> bool:
        """Enough tokens for the next (non-final) chunk."""
        return len(self.tokens) >= self.hop + TOKEN_OVERLAP

    @torch.inference_mode()
    def chunk(self) -> torch.Tensor:
        """The next non-final chunk (call when ready()): consumes `hop` tokens."""
        return self.chunk_many([self])[0]

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """The last chunk: every token left, nothing held back."""
        return self.chunk_many([self], final=True)[0]

    @staticmethod
    @torch.inference_mode()
    def chunk_many(streams: List["TokenStream"], final: bool = False) -> List[torch.Tensor]:
        """The next chunk of several streams whose chunks have one size (next_chunk_size), the flow run as one
        batch (the rows of a batch do not interact; only float rounding may differ from one-by-one runs).
        final: every stream's last chunk (all its tokens, nothing held back)."""
        tokens = [s.tokens if final else s.tokens[:s.hop + TOKEN_OVERLAP] for s in streams]
        if len({len(t) for t in tokens}) != 1:
            raise ValueError("chunk_many needs chunks of one size")
        if not tokens[0]:  # a segment without speech tokens
            return [torch.zeros(1, 0) for _ in streams]
        mels = TokenStream._flow_many(streams, tokens)
        wavs = [s._vocode(mel, final=final) for s, mel in zip(streams, mels)]
        for s in streams:
            if final:
                s.tokens = []
            else:
                s.tokens = s.tokens[s.hop:]
                s.hop = s.min_hop if s.chunks == 1 else min(s.max_hop, 2 * s.hop)
        return wavs

    @staticmethod
    def _flow_many(streams: List["TokenStream"], tokens: List[List[int]]) -> List[torch.Tensor]:
        """Flow for one chunk per stream (equal lengths): the official v1 chunk inference with its flow cache, the
        Euler steps of all streams in one batch. Raises Interrupted when every stream's `stop()` says so."""
        first = streams[0]
        flow = first.model.flow
        token = torch.tensor(tokens, dtype=torch.int64)  # (B, T)
        spks = torch.cat([flow.project_speaker(s.embedding) for s in streams])  # (B, 80)
        mu = torch.cat([flow.encode(token[i:i + 1]) for i in range(len(streams))])  # (B, 80, F)
        z = torch.cat([torch.randn(mu[:1].shape, generator=s.generator) if s.generator is not None
                       else torch.randn_like(mu[:1]) for s in streams])
        for i, s in enumerate(streams):  # the overlap frames start from the previous chunk's noise and mu
            n = s.flow_cache.shape[2]
            if n:
                z[i, :, :n] = s.flow_cache[0, :, :, 0]
                mu[i, :, :n] = s.flow_cache[0, :, :, 1]
            s.flow_cache = torch.stack([z[i:i + 1, :, -s.mel_overlap:], mu[i:i + 1, :, -s.mel_overlap:]], dim=-1)

        def check(step):
            if all(s.stop is not None and s.stop() for s in streams):
                raise Interrupted()

        t_span = flow.decoder.t_span(first.n_timesteps, dtype=mu.dtype)
        mel = flow.decoder.solve_euler(z, t_span, mu, mu.new_ones(1, 1, mu.shape[2]), spks, torch.zeros_like(mu),
                                       on_step=check)
        return list(mel.split(1, dim=0))

    def _vocode(self, mel: torch.Tensor, final: bool) -> torch.Tensor:
        """Flow output (1, 80, F) of this chunk -> waveform, with the official overlaps and caches."""
        model = self.model
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

    def next_chunk_size(self, final: bool = False) -> int:
        """Tokens the next chunk runs through the flow (for a non-final chunk: 0 when not ready)."""
        if final:
            return len(self.tokens)
        return self.hop + TOKEN_OVERLAP if self.ready() else 0
