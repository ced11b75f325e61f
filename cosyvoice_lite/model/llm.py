"""CosyVoice v1 text-to-speech-token language model (TransformerLM) and its sampler.

The LM reads [sos, speaker, encoded text, task_id] and then one embedding per generated speech token, and
predicts the next speech token (or EOS) at every position. Decoding runs the prefix once and then one
frame per token through the LM with a key/value cache.

Sampling reproduces the official ras_sampling draw for draw (same torch calls, shapes and order), so a run
after torch.manual_seed(seed) yields the same tokens as the official inference.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .precision import EXACT, Precision
from .transformer import KVCache


def nucleus_sampling(weighted_scores: Tensor, top_p: float = 0.8, top_k: int = 25,
                     generator: Optional[torch.Generator] = None) -> int:
    """Draw from the smallest set of most likely tokens whose mass reaches top_p, at most top_k of them.

    weighted_scores (V,) log-probabilities (or logits). Tokens are ranked by a stable descending sort of the
    softmax; the running mass is accumulated in float32 one token at a time, as the official loop does.
    The draw uses `generator` (default: the global torch RNG, as the official code).
    """
    probs = weighted_scores.softmax(dim=0)  # (V,)
    # Only the first top_k entries of the stable sort matter: sort just the values >= the k-th largest
    # (taken in index order, so ties keep the full stable sort's order).
    kth = probs.topk(min(top_k, probs.numel())).values[-1]
    candidates = (probs >= kth).nonzero().squeeze(1)  # ascending ids
    probs, order = probs[candidates].sort(descending=True, stable=True)
    order = candidates[order]
    head = probs[:top_k]
    cum = torch.from_numpy(np.cumsum(head.numpy(), dtype=np.float32))  # sequential float32 sums
    # token i is kept while the mass before it is < top_p (token 0 always)
    n = min(head.numel(), 1 + int((cum < top_p).sum()))
    pick = probs[:n].multinomial(1, replacement=True, generator=generator)
    return int(order[pick].item())


def random_sampling(weighted_scores: Tensor, generator: Optional[torch.Generator] = None) -> int:
    """Draw from the full softmax."""
    return int(weighted_scores.softmax(dim=0).multinomial(1, replacement=True, generator=generator).item())


def ras_sampling(weighted_scores: Tensor, decoded_tokens: List[int], top_p: float = 0.8, top_k: int = 25,
                 win_size: int = 10, tau_r: float = 0.1, generator: Optional[torch.Generator] = None) -> int:
    """Repetition-aware sampling: nucleus sampling, but if the drawn token already occurs often enough in the
    last win_size decoded tokens, ban it and draw from the full distribution instead.

    weighted_scores is modified in place when the fallback is taken (as in the official).
    """
    top_id = nucleus_sampling(weighted_scores, top_p=top_p, top_k=top_k, generator=generator)
    repeats = decoded_tokens[-win_size:].count(top_id)  # (official slice: win_size 0 means the whole history)
    if repeats >= win_size * tau_r:
        weighted_scores[top_id] = -float("inf")
        top_id = random_sampling(weighted_scores, generator=generator)
    return top_id


def token_limit(text_len: int, ratio: float) -> int:
    """int(text_len * ratio) computed like the official: an int32 tensor times a Python float (float32)."""
    return int(torch.tensor([text_len], dtype=torch.int32) * ratio)


class TransformerLM(nn.Module):
    """Text encoder + speech-token LM of CosyVoice v1 (llm.pt)."""

    def __init__(self, text_encoder_input_size: int, llm_input_size: int, llm_output_size: int,
                 text_token_size: int, speech_token_size: int, text_encoder: nn.Module, llm: nn.Module,
                 sampling: Optional[Dict] = None, spk_embed_dim: int = 192, policy: Precision = EXACT):
        super().__init__()
        self.llm_input_size = llm_input_size
        self.speech_token_size = speech_token_size
        self.text_embedding = policy.embedding(text_token_size, text_encoder_input_size, name="text_embedding")
        self.text_encoder = text_encoder
        self.text_encoder_affine_layer = policy.linear(text_encoder.output_size(), llm_input_size,
                                                       name="text_encoder_affine_layer")

        self.sos = 0  # rows of llm_embedding
        self.task_id = 1
        self.eos_token = speech_token_size  # last logit
        self.llm_embedding = policy.embedding(2, llm_input_size, name="llm_embedding")
        self.llm = llm
        self.llm_decoder = policy.linear(llm_output_size, speech_token_size + 1, name="llm_decoder")

        self.speech_embedding = policy.embedding(speech_token_size, llm_input_size, name="speech_embedding")
        self.spk_embed_affine_layer = policy.linear(spk_embed_dim, llm_input_size, name="spk_embed_affine_layer")
        self.sampling = dict(sampling or {})  # ras_sampling keyword arguments from the yaml

    # --- conditioning ---

    def encode_text(self, text_token: Tensor) -> Tensor:
        """text_token (1, L) int -> (1, L, llm_input_size). The text encoder is causal (static chunk 1)."""
        x = self.text_embedding(text_token)  # (1, L, text_encoder_input_size)
        x, _ = self.text_encoder(x, torch.tensor([text_token.size(1)], device=x.device), decoding_chunk_size=1)
        return self.text_encoder_affine_layer(x)

    def embed_speaker(self, embedding: Optional[Tensor]) -> Tensor:
        """(1, spk_embed_dim) raw speaker vector -> (1, 1, D); empty/None -> (1, 0, D) (no speaker slot)."""
        if embedding is None or embedding.numel() == 0:
            return torch.zeros(1, 0, self.llm_input_size, dtype=self.llm_embedding.weight.dtype,
                               device=self.llm_embedding.weight.device)
        embedding = F.normalize(embedding, dim=1)
        return self.spk_embed_affine_layer(embedding).unsqueeze(1)

    def prefix(self, text_token: Tensor, embedding: Optional[Tensor], prompt_text: Optional[Tensor] = None,
               prompt_speech: Optional[Tensor] = None) -> Tensor:
        """LM input before the first speech token -> (1, P, D):
        [sos, speaker (1, or 0 without embedding), text (Lp + L), task_id, prompt speech (Np)].

        A prompt (zero-shot: the reference clip's transcript (1, Lp) and its speech tokens (1, Np); instruct: the
        instruction as prompt_text) is encoded together with the text, so the causal text encoder reads the target
        text after it; the LM then continues the prompt's speech tokens."""
        if prompt_text is not None and prompt_text.numel():
            text_token = torch.cat([prompt_text.reshape(1, -1).to(text_token), text_token], dim=1)
        text = self.encode_text(text_token)  # (1, Lp + L, D)
        speaker = self.embed_speaker(embedding)  # (1, 1 or 0, D)
        sos = self.llm_embedding.weight[self.sos].reshape(1, 1, -1)
        task_id = self.llm_embedding.weight[self.task_id].reshape(1, 1, -1)
        if prompt_speech is not None and prompt_speech.numel():
            speech = self.embed_tokens(prompt_speech.reshape(1, -1).long())  # (1, Np, D)
        else:
            speech = text.new_zeros(1, 0, text.size(2))
        return torch.cat([sos, speaker, text, task_id, speech], dim=1)

    def embed_tokens(self, speech_token: Tensor) -> Tensor:
        """(1, N) speech token ids -> (1, N, D) LM input rows."""
        return self.speech_embedding(speech_token)

    # --- LM passes ---

    def forward_logits(self, lm_input: Tensor) -> Tensor:
        """One causal pass over a whole sequence (no cache): (1, T, D) -> raw logits (1, T, V+1)."""
        h, _ = self.llm(lm_input, torch.tensor([lm_input.size(1)], device=lm_input.device))
        return self.llm_decoder(h)

    def new_cache(self) -> KVCache:
        return self.llm.new_cache()

    def step(self, lm_input: Tensor, cache: KVCache) -> Tensor:
        """Feed new LM input rows (1, t, D) after those in `cache`; raw logits of the last one (1, V+1)."""
        h = self.llm.forward_chunk(lm_input, cache)  # (1, t, D)
        return self.llm_decoder(h[:, -1])

    # --- decoding ---

    def choose(self, logits: Tensor, decoded: List[int], allow_eos: bool, sampling: Dict,
               generator: Optional[torch.Generator] = None) -> int:
        """Next token from raw logits (1, V+1): log_softmax, EOS banned unless allowed, then ras_sampling."""
        logp = logits.log_softmax(dim=-1).squeeze(0)  # (V+1,)
        if not allow_eos:
            logp[self.eos_token] = -float("inf")
        return ras_sampling(logp, decoded, generator=generator, **sampling)

    def length_limits(self, text_len: int, min_token_text_ratio: float = 2,
                      max_token_text_ratio: float = 20) -> tuple:
        """(min_len, max_len) speech tokens for a text of text_len tokens, computed like the official."""
        return token_limit(text_len, min_token_text_ratio), token_limit(text_len, max_token_text_ratio)
