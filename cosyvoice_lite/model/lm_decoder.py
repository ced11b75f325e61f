"""Token-by-token decoding of the TransformerLM for many sequences at once.

A `Sequence` is one request's decoding state (KV cache, tokens so far, length limits, its own RNG). `LMDecoder.step`
advances any number of sequences by one token:

- exact mode: each sequence runs `TransformerLM.step` on its own, exactly like `TransformerLM.generate` (same
  numerics and, with no per-request generator, the same draws from the global RNG);
- other modes: the new frames of all sequences go through every linear layer together (one weight read per
  token step, whatever the number of sequences); only attention runs per sequence, against its own cache.
  Relative-position projections are shared: ``linear_pos`` of relative position r is the same for every
  sequence, so each layer keeps one table of them, extended in blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .transformer import KVCache


@dataclass
class Sequence:
    cache: KVCache
    prefix: Optional[Tensor]          # (1, L+3, D) LM input before the first step; None afterwards
    min_len: int
    max_len: int
    sampling: Dict
    generator: Optional[torch.Generator] = None
    decoded: List[int] = field(default_factory=list)
    finished: bool = False

    @property
    def steps(self) -> int:
        return len(self.decoded)


class PositionTable:
    """Per LM layer: linear_pos(encoding of relative position r) for r = R-1, ..., 1, 0 (descending), (H, R, d_k).

    Descending order makes the rows for a query at position n-1 a plain slice: key j meets relative position
    n-1-j, i.e. the last n rows. R grows in blocks as sequences get longer.
    """

    BLOCK = 256

    def __init__(self, encoder):
        self.encoder = encoder
        self.tables: List[Optional[Tensor]] = [None] * len(encoder.encoders)

    def get(self, index: int, n: int) -> Tensor:
        """Relative positions n-1 .. 0 of layer `index` as (H, n, d_k)."""
        table = self.tables[index]
        if table is None or table.size(1) < n:
            size = -(-n // self.BLOCK) * self.BLOCK
            attn = self.encoder.encoders[index].self_attn
            pe = self.encoder.pos_enc.rows(size - 1, 0, torch.empty(0))[0]  # (size, D), r descending
            table = attn.linear_pos(pe).view(size, attn.h, attn.d_k).transpose(0, 1).contiguous()
            self.tables[index] = table
        return table[:, table.size(1) - n:]


class LMDecoder:
    def __init__(self, llm, batched: bool):
        self.llm = llm
        self.batched = batched
        self.positions = PositionTable(llm.llm) if batched else None

    @torch.inference_mode()
    def start(self, text_token: Tensor, embedding: Optional[Tensor], min_token_text_ratio: float = 2,
              max_token_text_ratio: float = 20, sampling: Optional[Dict] = None,
              generator: Optional[torch.Generator] = None) -> Sequence:
        """A new sequence for text_token (1, L) and a raw speaker embedding (1, spk_embed_dim) or None."""
        min_len, max_len = self.llm.length_limits(text_token.size(1), min_token_text_ratio, max_token_text_ratio)
        return Sequence(self.llm.new_cache(), self.llm.prefix(text_token, embedding), min_len, max_len,
                        {**self.llm.sampling, **(sampling or {})}, generator, finished=max_len <= 0)

    @torch.inference_mode()
    def logits(self, seqs: List[Sequence]) -> Tensor:
        """Raw next-token logits (B, V+1) of unfinished sequences; feeds each one's last token (or its prefix)."""
        rows: Dict[int, Tensor] = {}
        old = []
        for s in seqs:
            if s.prefix is not None:  # the prefix is a multi-frame pass of its own
                rows[id(s)] = self.llm.step(s.prefix, s.cache)
                s.prefix = None
            else:
                old.append(s)
        if old and self.batched:
            batch = self._batched_step(old)
            for i, s in enumerate(old):
                rows[id(s)] = batch[i:i + 1]
        else:
            for s in old:
                rows[id(s)] = self.llm.step(self._last_input(s), s.cache)
        return torch.cat([rows[id(s)] for s in seqs], dim=0)

    def push(self, s: Sequence, token: int) -> Optional[int]:
        """Record the chosen token; returns it, or None when it is EOS (the sequence then ends)."""
        if token == self.llm.eos_token:
            s.finished = True
            return None
        s.decoded.append(token)
        s.finished = s.steps >= s.max_len
        return token

    @torch.inference_mode()
    def step(self, seqs: List[Sequence]) -> List[Optional[int]]:
        """Advance every unfinished sequence by one sampled token; returns the new token per sequence (None for
        a sequence that has ended: EOS drawn now or earlier, or max_len reached before)."""
        live = [s for s in seqs if not s.finished]
        tokens = {}
        if live:
            logits = self.logits(live)
            for i, s in enumerate(live):
                token = self.llm.choose(logits[i:i + 1], s.decoded, allow_eos=s.steps >= s.min_len,
                                        sampling=s.sampling, generator=s.generator)
                tokens[id(s)] = self.push(s, token)
        return [tokens.get(id(s)) for s in seqs]

    @torch.inference_mode()
    def greedy(self, text_token: Tensor, embedding: Optional[Tensor], n: int,
               forced: Optional[List[int]] = None) -> tuple:
        """n argmax tokens (EOS excluded) and the raw logits (n, V+1) before each: the quality guard of the fast
        modes. With `forced` (n tokens), those tokens are fed instead (teacher forcing) and returned."""
        s = self.start(text_token, embedding, min_token_text_ratio=0, max_token_text_ratio=10 ** 6)
        rows = []
        for i in range(n):
            logits = self.logits([s])
            rows.append(logits)
            self.push(s, forced[i] if forced is not None else int(logits[0, :self.llm.eos_token].argmax()))
        return list(s.decoded), torch.cat(rows, dim=0)

    def _last_input(self, s: Sequence) -> Tensor:
        return self.llm.speech_embedding.weight[s.decoded[-1]].reshape(1, 1, -1)

    def _batched_step(self, seqs: List[Sequence]) -> Tensor:
        """One new frame for each sequence (all past their prefix) -> raw logits (B, V+1)."""
        enc = self.llm.llm
        tokens = torch.tensor([s.decoded[-1] for s in seqs])
        x = self.llm.speech_embedding(tokens).unsqueeze(1)  # (B, 1, D)
        x = enc.embed(x) * enc.pos_enc.xscale
        for index, layer in enumerate(enc.encoders):
            x = x + self._attention(index, layer.self_attn, layer.norm1(x), seqs)
            x = x + self._feed_forward(layer.feed_forward, layer.norm2(x))
        x = enc.after_norm(x)
        return self.llm.llm_decoder(x[:, 0])  # (B, V+1)

    @staticmethod
    def _feed_forward(ff, x: Tensor) -> Tensor:
        from .speed import Int8Linear

        if isinstance(ff.w_1, Int8Linear) and isinstance(ff.activation, nn.ReLU):  # one fbgemm call for both
            return ff.w_2(torch.ops.quantized.linear_relu_dynamic(x, ff.w_1._packed, True))
        return ff(x)

    def _attention(self, index: int, attn, x: Tensor, seqs: List[Sequence]) -> Tensor:
        """x (B, 1, D) normalised frames -> attention output (B, 1, D); appends k/v to each sequence's cache."""
        B = x.size(0)
        q, k, v = attn.project_qkv(x)  # q (B, 1, H, d_k); k, v (B, H, 1, d_k)
        q_u = (q + attn.pos_bias_u).transpose(1, 2)  # (B, H, 1, d_k)
        q_v = (q + attn.pos_bias_v).transpose(1, 2)
        scale = 1.0 / math.sqrt(attn.d_k)
        outs = []
        for b, s in enumerate(seqs):
            keys, values = s.cache.layers[index].append_kv(k[b:b + 1], v[b:b + 1])  # (1, H, n, d_k)
            pos = self.positions.get(index, keys.size(2))  # (H, n, d_k): relative position of each key
            bd = torch.bmm(q_v[b], pos.transpose(1, 2))  # (H, 1, n)
            scores = torch.baddbmm(bd, q_u[b], keys[0].transpose(1, 2), beta=scale, alpha=scale)
            outs.append(torch.bmm(torch.softmax(scores, dim=-1), values[0]))  # (H, 1, d_k)
        out = torch.stack(outs, dim=0).transpose(1, 2).reshape(B, 1, -1)  # (B, 1, H*d_k)
        return attn.linear_out(out)
