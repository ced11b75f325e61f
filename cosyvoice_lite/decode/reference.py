"""The whole-utterance reference path: one segment decoded start to end, in the official order of random draws
(LLM sampling, flow start noise, HiFT source), so that a seeded call reproduces the official ``inference_sft``.

The service streams through the scheduler instead; this path is what parity checks, tools and tests compare with.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..model.flow import stretch
from .lm_decoder import LMDecoder


@torch.inference_mode()
def generate(llm, text_token: Tensor, embedding: Optional[Tensor], min_token_text_ratio: float = 2,
             max_token_text_ratio: float = 20, sampling: Optional[Dict] = None,
             on_logits: Optional[Callable[[int, Tensor], None]] = None) -> Iterator[int]:
    """Yield speech token ids of a TransformerLM one by one until EOS or max_len = int(L * max_token_text_ratio).

    text_token (1, L) int; embedding (1, spk_embed_dim) raw speaker vector (or None).
    EOS cannot be drawn before min_len = int(L * min_token_text_ratio) tokens.
    sampling overrides the yaml ras_sampling arguments (top_p, top_k, win_size, tau_r).
    on_logits(step, raw_logits (1, V+1)) is called at every step before sampling (for tests / inspection).
    Each sequence is stepped on its own in float32 (the official numerics), whatever the model's mode.
    """
    decoder = LMDecoder(llm, batched=False)
    seq = decoder.start(text_token, embedding, min_token_text_ratio, max_token_text_ratio, sampling,
                        on_logits=on_logits)
    yield from decoder.tokens(seq)


@torch.inference_mode()
def text_to_tokens(model, text_token: Sequence[int] | Tensor, speaker: str, **sampling) -> Iterator[int]:
    """Yield speech token ids one by one with the decoder of the model's mode; ``sampling`` overrides the LLM's
    length ratios (min_token_text_ratio, max_token_text_ratio)."""
    decoder = LMDecoder.for_model(model)
    text = torch.as_tensor(text_token, dtype=torch.int64).reshape(1, -1)
    yield from decoder.tokens(decoder.start(text, model.embedding(speaker), **sampling))


@torch.inference_mode()
def synthesize(model, text_token: Sequence[int] | Tensor, speaker: str, seed: Optional[int] = None,
               speed: float = 1.0, n_timesteps: Optional[int] = None, **sampling) -> Tensor:
    """Whole SFT path for one text segment -> (1, S) waveform. ``speed`` stretches the mel in time before the
    vocoder, as the official non-streaming path does."""
    if seed is not None:
        torch.manual_seed(seed)
    tokens = list(text_to_tokens(model, text_token, speaker, **sampling))
    if not tokens:
        return torch.zeros(1, 0)
    mel = model.tokens_to_mel(tokens, speaker, n_timesteps=n_timesteps)
    return model.mel_to_wav(stretch(mel, speed))
