"""Speech tokens -> waveform in chunks while the LLM is still decoding, the way official CosyVoice v1 streams.

Every chunk runs the flow on ``hop + overlap`` tokens: the last ``overlap`` tokens (20, i.e. 34 mel frames) are
shared with the next chunk, which starts from the same noise and mu for them (the flow cache) and cross-fades its
first frames with them (Hamming window). HiFT sees the previous chunk's last 20 mel frames again (its excitation is
copied over for their 20 * 256 samples) and the speech of those frames is cross-faded too, so the chunks join without
clicks; those samples of each chunk are held back for that fade. The hop starts small (``first_hop``, for a short
first wait), then is 100 tokens and doubles up to 200, as larger chunks waste less on overlaps.

With ``hop_growth`` (a factor above 1) the hops grow from the first one by that factor instead, up to the same 200:
each chunk then takes about as long to make as the previous one lasts, so a listener who is served faster than real
time hears no gap after the first chunk (the official second hop of 100 tokens takes longer than the first chunk's
half second of audio on most CPUs). The scheduler picks the factor from its measured speed, and only while it keeps
up with real time: behind it, gaps cannot be avoided and the official hops, fewer overlaps, make them shorter in sum.

A voice with a reference clip (cloned, or the target of a voice conversion) is the flow's prompt in every chunk, as
in the official v1 streaming: its speech tokens are encoded before the chunk's, its mel conditions the first Fp
frames, and the flow cache carries the prompt frames' noise from chunk to chunk along with the overlap's. Only the
speaker projection is the same in every chunk (computed once per stream): the v1 flow encoder and the estimator
attend over all frames, so the prompt's encodings and every Euler step over its Fp frames depend on the chunk's
tokens, and each chunk pays for Fp + F frames (docs/performance.md has the figures).

The join between the first and the second chunk may use shorter overlaps (``first_overlap`` tokens and
``first_cache`` HiFT frames): the first chunk then needs fewer tokens and a shorter flow pass, so the first audio
comes sooner, at the price of a shorter cross-fade at that one join. The official values are the default.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional

import numpy as np
import torch

from ..cancel import Cancelled
from ..memory import release_free_memory
from ..model.cosyvoice import flow_conditioning
from ..model.flow import stretch

TOKEN_OVERLAP = 20        # tokens shared by consecutive flow chunks (official token_overlap_len)
HIFT_CACHE_FRAMES = 20    # mel frames HiFT sees twice (official mel_cache_len)
# Chunks of at least this many mel frames (~1.2 s) hand the flow's freed memory back to the OS before HiFT runs:
# HiFT's activations are the largest of a chunk, and without this they come on top of the flow's freed but still
# resident pages. Shorter chunks (the first of a stream) skip it, so that the first audio is not delayed.
TRIM_BEFORE_HIFT_FRAMES = 100


def crossfade(head: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Fade the first n = tail.shape[-1] samples of `head` in over `tail` (fading out), with the two halves of a
    symmetric Hamming window of 2n points (numpy.hamming), as the official streaming does."""
    n = tail.shape[-1]
    window = torch.from_numpy(np.hamming(2 * n))
    head = head.clone()
    mixed = head[..., :n].double() * window[:n] + tail.double() * window[n:]
    head[..., :n] = mixed.to(head.dtype)
    return head


class TokenStream:
    """Collects one segment's speech tokens and turns them into waveform chunks (1, S) at the model's rate."""

    def __init__(self, model, voice, n_timesteps: Optional[int] = None, speed: float = 1.0,
                 generator: Optional[torch.Generator] = None, first_hop: Optional[int] = None,
                 hop: Optional[int] = None, max_hop: Optional[int] = None, stop: Optional[Callable[[], bool]] = None,
                 first_overlap: int = TOKEN_OVERLAP, first_cache: int = HIFT_CACHE_FRAMES, hop_growth: float = 0.0):
        self.model = model
        self.stop = stop  # polled between Euler steps: True = the listener is gone
        conditioning = flow_conditioning(voice)
        self.embedding = conditioning["embedding"]  # (1, D)
        with torch.inference_mode():  # the same in every chunk: projected once
            self.spks = model.flow.project_speaker(self.embedding)  # (1, 80)
        self.prompt_token = conditioning["prompt_token"]  # (1, Np) or None
        self.prompt_feat = conditioning["prompt_feat"]  # (1, Fp, 80) or None
        self.prompt_frames = 0 if self.prompt_feat is None else self.prompt_feat.shape[1]
        self.n_timesteps = n_timesteps or model.n_timesteps
        self.speed = speed
        self.generator = generator
        rate = model.token_rate
        self.min_hop = hop or 2 * rate                     # official token_min_hop_len (100)
        self.max_hop = max_hop or 4 * rate                 # official token_max_hop_len (200)
        if first_overlap < 1 or first_cache < 1:
            raise ValueError("first_overlap and first_cache must be at least 1")
        # overlaps at the end of the coming chunk: shorter ones may be asked for the first join only
        self.overlap = first_overlap                       # tokens shared with the next chunk
        self.cache_frames = first_cache                    # mel frames HiFT sees again in the next chunk
        self.hop = max(first_hop or self.min_hop, self._smallest_hop(speed))
        if hop_growth and hop_growth <= 1:
            raise ValueError("hop_growth must be above 1 (or 0: the official hops)")
        self.hop_growth = hop_growth
        self.tokens: List[int] = []
        self.flow_cache = torch.zeros(1, model.flow.output_size, 0, 2)
        self.mel_tail: Optional[torch.Tensor] = None       # mel frames of the previous chunk's overlap
        self.hift_cache: Optional[dict] = None
        self.chunks = 0

    @property
    def mel_overlap(self) -> int:
        """Mel frames of the coming chunk's token overlap (34 for the official 20 tokens)."""
        return self.model.flow.n_frames(self.overlap)

    def _smallest_hop(self, speed: float) -> int:
        """Smallest hop whose chunk still leaves 2 * cache_frames mel frames to vocode after the overlap is held
        back and the tempo change is applied (HiFT keeps cache_frames of each chunk for the next one)."""
        hop = 1
        while int((self.model.flow.n_frames(hop + self.overlap) - self.mel_overlap) / speed) < 2 * self.cache_frames:
            hop += 1
        return hop

    def _next_hop(self) -> int:
        """The hop after a (non-final) chunk: official (min_hop after the first chunk, then doubling) or grown by
        hop_growth; up to max_hop, and at least the smallest hop of the joins to come."""
        if self.hop_growth:
            hop = max(self.hop + 1, round(self.hop * self.hop_growth))
        else:
            hop = self.min_hop if self.chunks == 1 else 2 * self.hop
        return max(min(self.max_hop, hop), self._smallest_hop(self.speed))

    def push(self, token: int) -> None:
        self.tokens.append(token)

    def ready(self) -> bool:
        """Enough tokens for the next (non-final) chunk."""
        return len(self.tokens) >= self.hop + self.overlap

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
        tokens = [s.tokens if final else s.tokens[:s.hop + s.overlap] for s in streams]
        if len({len(t) for t in tokens}) != 1 or len({s.prompt_frames for s in streams}) != 1:
            raise ValueError("chunk_many needs chunks of one size (and prompts of one length)")
        if not tokens[0]:  # a segment without speech tokens
            return [torch.zeros(1, 0) for _ in streams]
        mels = TokenStream._flow_many(streams, tokens)
        if mels[0].shape[2] >= TRIM_BEFORE_HIFT_FRAMES:
            release_free_memory()
        wavs = [s._vocode(mel, final=final) for s, mel in zip(streams, mels)]
        for s in streams:
            if final:
                s.tokens = []
            else:
                s.tokens = s.tokens[s.hop:]
                s.overlap, s.cache_frames = TOKEN_OVERLAP, HIFT_CACHE_FRAMES  # official joins after the first
                s.hop = s._next_hop()
        return wavs

    @staticmethod
    def _flow_many(streams: List["TokenStream"], tokens: List[List[int]]) -> List[torch.Tensor]:
        """Flow for one chunk per stream (equal lengths): the official v1 chunk inference with its flow cache, the
        Euler steps of all streams in one batch. Raises Cancelled when every stream's `stop()` says so."""
        first = streams[0]
        flow = first.model.flow
        token = torch.tensor(tokens, dtype=torch.int64)  # (B, T)
        spks = torch.cat([s.spks for s in streams])  # (B, 80)
        prompt_frames = first.prompt_frames
        mu = torch.cat([flow.encode(token[i:i + 1], s.prompt_token, prompt_frames)
                        for i, s in enumerate(streams)])  # (B, 80, Fp + F)
        z = torch.cat([torch.randn(mu[:1].shape, generator=s.generator) if s.generator is not None
                       else torch.randn_like(mu[:1]) for s in streams])
        cond = torch.cat([flow.prompt_cond(s.prompt_feat, mu.shape[2]) for s in streams]) if prompt_frames else None
        def check(step):
            if all(s.stop is not None and s.stop() for s in streams):
                raise Cancelled()

        try:
            mel, caches = flow.solve(mu, spks, z, first.n_timesteps, caches=[s.flow_cache for s in streams],
                                     keep=[s.mel_overlap for s in streams], on_step=check, cond=cond,
                                     prompt_frames=prompt_frames)
        finally:
            # a compiled estimator (backends/) would keep buffers for the largest batch it has run, through the
            # vocoder's turn and the LLM steps that follow: once per chunk, reallocating them costs little
            release = getattr(flow.decoder.estimator, "release_buffers", None)
            if release is not None:
                release()
        for s, cache in zip(streams, caches):
            s.flow_cache = cache
        return list(mel.split(1, dim=0))

    def _vocode(self, mel: torch.Tensor, final: bool) -> torch.Tensor:
        """Flow output (1, 80, F) of this chunk -> waveform, joined to the previous chunk (overlaps and caches)."""
        model = self.model
        if self.mel_tail is not None:
            mel = crossfade(mel, self.mel_tail)
        if not final:
            self.mel_tail = mel[:, :, -self.mel_overlap:]
            mel = mel[:, :, :-self.mel_overlap]
        mel = stretch(mel, self.speed)
        if self.hift_cache is not None:
            mel = torch.cat([self.hift_cache["mel"], mel], dim=2)
            cache_source = self.hift_cache["source"]
        else:
            cache_source = torch.zeros(1, 1, 0)
        speech, source = model.hift(mel, cache_source, generator=self.generator)
        if self.hift_cache is not None:
            speech = crossfade(speech, self.hift_cache["speech"])
        self.chunks += 1
        if final:
            return speech
        samples = self.cache_frames * model.samples_per_frame  # 5120 for the official 20 frames
        self.hift_cache = {"mel": mel[:, :, -self.cache_frames:], "source": source[:, :, -samples:],
                           "speech": speech[:, -samples:]}
        return speech[:, :-samples]

    def next_chunk_size(self, final: bool = False) -> int:
        """Tokens the next chunk runs through the flow (for a non-final chunk: 0 when not ready)."""
        if final:
            return len(self.tokens)
        return self.hop + self.overlap if self.ready() else 0


def stream_tokens(model, tokens, voice, n_timesteps: Optional[int] = None, speed: float = 1.0,
                  generator: Optional[torch.Generator] = None, **options) -> Iterator[torch.Tensor]:
    """Speech tokens known in advance (a voice conversion's source tokens) -> waveform chunks (1, S), the way the
    official v1 streaming handles them once the LLM (or, for VC, the tokenizer) is done: chunks while there are
    enough tokens for one, then the rest. ``options``: TokenStream's (first_hop, hop, stop, ...)."""
    stream = TokenStream(model, voice, n_timesteps, speed, generator, **options)
    for token in tokens:
        stream.push(int(token))
    with torch.inference_mode():
        while stream.ready():
            yield stream.chunk()
        yield stream.finish()
