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
    """Per LM layer: linear_pos(encoding of relative position r) for r = R-1, ..., 1, 0 (descending), (H, d_k, R).

    Descending order makes the rows for a query at position n-1 a plain slice: key j meets relative position
    n-1-j, i.e. the last n rows. R grows in blocks as sequences get longer.
    """

    BLOCK = 128

    def __init__(self, encoder):
        self.encoder = encoder
        self.tables: List[Optional[Tensor]] = [None] * len(encoder.encoders)

    def get_transposed(self, index: int, n: int) -> Tensor:
        """Relative positions n-1 .. 0 of layer `index` as (H, d_k, n) (ready to multiply queries with)."""
        table = self.tables[index]
        if table is None or table.size(2) < n:
            size = -(-n // self.BLOCK) * self.BLOCK
            attn = self.encoder.encoders[index].self_attn
            pe = self.encoder.pos_enc.rows(size - 1, 0, torch.empty(0))[0]  # (size, D), r descending
            table = attn.linear_pos(pe).view(size, attn.h, attn.d_k).permute(1, 2, 0).contiguous()
            self.tables[index] = table
        return table[:, :, table.size(2) - n:]


class LMDecoder:
    def __init__(self, llm, batched: bool):
        self.llm = llm
        self.batched = batched
        self.positions = PositionTable(llm.llm) if batched else None
        self._plan = None

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
        """One new frame for each sequence (all past their prefix) -> raw logits (B, V+1).

        Written for the per-token cost on a CPU: 2-D (B, D) activations, fbgemm calls without module dispatch,
        linear+ReLU fused, and the attention of each sequence in three small batched matmuls over heads.
        """
        enc = self.llm.llm
        if self._plan is None:
            self._plan = [_LayerPlan(layer) for layer in enc.encoders]
        tokens = torch.tensor([s.decoded[-1] for s in seqs])
        x = enc.embed(self.llm.speech_embedding(tokens)) * enc.pos_enc.xscale  # (B, D)
        caches = [s.cache.layers for s in seqs]
        for index, plan in enumerate(self._plan):
            x = x + plan.out(self._attention(index, plan, plan.norm1(x), caches))
            x = x + plan.w2(plan.w1_relu(plan.norm2(x)))
        return self.llm.llm_decoder(enc.after_norm(x))  # (B, V+1)

    def _attention(self, index: int, plan: "_LayerPlan", x: Tensor, caches) -> Tensor:
        """x (B, D) normalised frames -> attention values (B, D) before the output projection; appends each
        sequence's key and value to its cache."""
        B = x.size(0)
        H, d_k = plan.heads, plan.d_k
        qkv = plan.qkv(x).view(B, 3, H, d_k)
        q = qkv[:, 0]
        q_u = (q + plan.bias_u).unsqueeze(2)  # (B, H, 1, d_k)
        q_v = (q + plan.bias_v).unsqueeze(2)
        outs = []
        for b, layers in enumerate(caches):
            cache = layers[index]
            n = cache.length
            if cache.k is None or cache.k.size(2) <= n:
                cache.append_kv(qkv[b:b + 1, 1].unsqueeze(2), qkv[b:b + 1, 2].unsqueeze(2))  # grows the buffers
            else:
                cache.k[0, :, n] = qkv[b, 1]
                cache.v[0, :, n] = qkv[b, 2]
                cache.length = n + 1
            keys, values = cache.k[0, :, :n + 1], cache.v[0, :, :n + 1]  # (H, n+1, d_k)
            pos = self.positions.get_transposed(index, n + 1)  # (H, d_k, n+1): relative position of each key
            scores = torch.baddbmm(torch.bmm(q_v[b], pos), q_u[b], keys.transpose(1, 2),
                                   beta=plan.scale, alpha=plan.scale)  # (H, 1, n+1)
            outs.append(torch.bmm(torch.softmax(scores, dim=-1), values))  # (H, 1, d_k)
        out = outs[0] if B == 1 else torch.stack(outs)
        return out.reshape(B, H * d_k)


class _LayerPlan:
    """The pieces of one LM layer the batched step calls, looked up once (fbgemm packs called directly)."""

    def __init__(self, layer):
        from .speed import Int8Linear

        attn, ff = layer.self_attn, layer.feed_forward
        self.heads, self.d_k = attn.h, attn.d_k
        self.scale = 1.0 / math.sqrt(attn.d_k)
        self.bias_u, self.bias_v = attn.pos_bias_u, attn.pos_bias_v  # (H, d_k)
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.qkv = _direct(attn.linear_qkv) if attn.linear_qkv is not None else _separate_qkv(attn)
        self.out = _direct(attn.linear_out)
        self.w2 = _direct(ff.w_2)
        if isinstance(ff.w_1, Int8Linear) and isinstance(ff.activation, nn.ReLU):
            packed = ff.w_1._packed
            self.w1_relu = lambda x: torch.ops.quantized.linear_relu_dynamic(x, packed, True)
        else:
            self.w1_relu = lambda x: ff.activation(ff.w_1(x))


def _direct(linear):
    """The layer's forward without nn.Module dispatch (for fbgemm int8 layers)."""
    from .speed import Int8Linear

    if isinstance(linear, Int8Linear):
        packed = linear._packed
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)
    return linear


def _separate_qkv(attn):
    return lambda x: torch.cat([attn.linear_q(x), attn.linear_k(x), attn.linear_v(x)], dim=-1)
