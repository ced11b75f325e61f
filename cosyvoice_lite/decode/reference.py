"""The whole-utterance reference path: one segment decoded start to end, in the official order of random draws
(LLM sampling, flow start noise, HiFT source), so that a seeded call reproduces the official ``inference_sft`` (a
speaker id), ``inference_zero_shot`` / ``inference_cross_lingual`` / ``inference_instruct`` (a voice) or, without
the LLM, ``inference_vc`` (``convert``).

The service streams through the scheduler instead; this path is what parity checks, tools and tests compare with.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..model.cosyvoice import llm_conditioning
from ..model.flow import stretch
from .lm_decoder import LMDecoder


@torch.inference_mode()
def generate(llm, text_token: Tensor, embedding: Optional[Tensor], min_token_text_ratio: float = 2,
             max_token_text_ratio: float = 20, sampling: Optional[Dict] = None,
             on_logits: Optional[Callable[[int, Tensor], None]] = None, prompt_text: Optional[Tensor] = None,
             prompt_speech: Optional[Tensor] = None) -> Iterator[int]:
    """Yield speech token ids of a TransformerLM one by one until EOS or max_len = int(L * max_token_text_ratio).

    text_token (1, L) int; embedding (1, spk_embed_dim) raw speaker vector (or None).
    EOS cannot be drawn before min_len = int(L * min_token_text_ratio) tokens.
    sampling overrides the yaml ras_sampling arguments (top_p, top_k, win_size, tau_r).
    on_logits(step, raw_logits (1, V+1)) is called at every step before sampling (for tests / inspection).
    Each sequence is stepped on its own in float32 (the official numerics), whatever the model's mode.
    prompt_text (1, Lp) / prompt_speech (1, Np): a prompt the LM continues (TransformerLM.prefix); the length
    limits still count the target text only.
    """
    decoder = LMDecoder(llm, batched=False)
    seq = decoder.start(text_token, embedding, min_token_text_ratio, max_token_text_ratio, sampling,
                        on_logits=on_logits, prompt_text=prompt_text, prompt_speech=prompt_speech)
    yield from decoder.tokens(seq)


@torch.inference_mode()
def text_to_tokens(model, text_token: Sequence[int] | Tensor, speaker, **sampling) -> Iterator[int]:
    """Yield speech token ids one by one with the decoder of the model's mode, for a speaker id or a voice (its
    embedding, prompt text and prompt speech: see llm_conditioning); ``sampling`` overrides the LLM's length
    ratios (min_token_text_ratio, max_token_text_ratio), which count the target text only."""
    decoder = LMDecoder.for_model(model)
    text = torch.as_tensor(text_token, dtype=torch.int64).reshape(1, -1)
    if isinstance(speaker, str):
        conditioning = {"embedding": model.embedding(speaker)}
    else:
        conditioning = llm_conditioning(speaker)
    yield from decoder.tokens(decoder.start(text, **conditioning, **sampling))


@torch.inference_mode()
def synthesize(model, text_token: Sequence[int] | Tensor, speaker, seed: Optional[int] = None,
               speed: float = 1.0, n_timesteps: Optional[int] = None, **sampling) -> Tensor:
    """Whole path for one text segment and a speaker id or a voice -> (1, S) waveform. ``speed`` stretches the mel in time before the
    vocoder, as the official non-streaming path does."""
    if seed is not None:
        torch.manual_seed(seed)
    tokens = list(text_to_tokens(model, text_token, speaker, **sampling))
    if not tokens:
        return torch.zeros(1, 0)
    mel = model.tokens_to_mel(tokens, speaker, n_timesteps=n_timesteps)
    return model.mel_to_wav(stretch(mel, speed))


@torch.inference_mode()
def convert(model, source_token: Sequence[int] | Tensor, voice, seed: Optional[int] = None, speed: float = 1.0,
            n_timesteps: Optional[int] = None) -> Tensor:
    """Voice conversion (the official inference_vc; no LLM): the speech tokens of a source clip said again in
    `voice`, whose clip's tokens and mel are the flow's prompt and whose embedding is the speaker -> (1, S)."""
    if torch.as_tensor(source_token).numel() == 0:
        return torch.zeros(1, 0)
    if seed is not None:
        torch.manual_seed(seed)
    mel = model.tokens_to_mel(source_token, voice, n_timesteps=n_timesteps)
    return model.mel_to_wav(stretch(mel, speed))
