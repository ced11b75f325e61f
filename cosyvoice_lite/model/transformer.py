"""ESPnet/WeNet-style encoders used by CosyVoice v1: the LLM's text encoder and LM, and the flow's token encoder.

Only what the v1 configs use is implemented: a linear input layer ('linear' or 'linear_legacy'), the
'rel_pos_espnet' relative positional encoding, relative-position multi-head self-attention (Transformer-XL
style with pos_bias_u / pos_bias_v), pre-norm layers with a position-wise feed-forward block, and a final
LayerNorm. Attention is either full (static_chunk_size 0) or limited to the current and earlier chunks
(static_chunk_size > 0; chunk size 1 makes it causal, which is how the LLM uses it).

For autoregressive decoding, `forward_chunk` runs only the new frames through the layers and keeps keys,
values and projected positions per layer in a `KVCache`, so a step costs one pass over the new frame(s).

Parameter names equal the official ones so that official state dicts load strictly. Every linear layer comes from
the precision policy the encoder is built with (``precision.py``; float32 nn.Linear by default).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .precision import EXACT, Precision

ACTIVATIONS = {
    "relu": nn.ReLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "selu": nn.SELU,
    "hardtanh": nn.Hardtanh,
}


class EspnetRelPositionalEncoding(nn.Module):
    """Sinusoid table indexed by relative position, largest positive offset first.

    Row order of `table(n)`: relative positions n-1, n-2, ..., 0, -1, ..., -(n-1), i.e. (query - key) offsets.
    The table starts at 512 positions (the official builds 5000) and is rebuilt larger on demand,
    so arbitrarily long inputs work. It holds no parameters.
    """

    def __init__(self, d_model: int, max_len: int = 5000):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self._pe: Optional[Tensor] = None  # (2M-1, d_model)
        # Built for 512 positions and doubled on demand: a row's values do not depend on the table size, and a
        # full 5000-position table costs 40 MB per 1024-wide encoder.
        self._extend(min(max_len, 512))

    def _extend(self, n: int):
        # explicit device: the table is a constant, also when the modules are built on the meta device
        half = torch.arange(0, self.d_model, 2, dtype=torch.float32, device="cpu")
        inv_freq = torch.exp(half * -(math.log(10000.0) / self.d_model))  # (d/2,)
        position = torch.arange(0, n, dtype=torch.float32, device="cpu").unsqueeze(1)  # (n, 1)
        positive = torch.zeros(n, self.d_model, device="cpu")
        negative = torch.zeros(n, self.d_model, device="cpu")
        positive[:, 0::2] = torch.sin(position * inv_freq)
        positive[:, 1::2] = torch.cos(position * inv_freq)
        negative[:, 0::2] = torch.sin(-1 * position * inv_freq)
        negative[:, 1::2] = torch.cos(-1 * position * inv_freq)
        self._pe = torch.cat([positive.flip(0), negative[1:]], dim=0)  # (2n-1, d)

    @property
    def max_len(self) -> int:
        return (self._pe.size(0) + 1) // 2

    def rows(self, hi: int, lo: int, like: Tensor) -> Tensor:
        """Encodings of relative positions hi, hi-1, ..., lo (hi >= lo) as (1, hi-lo+1, d)."""
        need = max(abs(hi), abs(lo)) + 1
        if need > self.max_len:
            self._extend(max(need, 2 * self.max_len))
        pe = self._pe
        center = (pe.size(0) - 1) // 2  # row of relative position 0
        return pe[center - hi: center - lo + 1].unsqueeze(0).to(dtype=like.dtype, device=like.device)


class LinearNoSubsampling(nn.Module):
    """Linear -> LayerNorm (-> ReLU for the legacy variant); no time subsampling."""

    def __init__(self, idim: int, odim: int, legacy: bool = False, policy: Precision = EXACT):
        super().__init__()
        layers = [policy.linear(idim, odim, name="out.0"), nn.LayerNorm(odim, eps=1e-5)]
        if legacy:
            layers.append(nn.ReLU())
        self.out = nn.Sequential(*layers)  # names out.0 / out.1 as in the official (dropout held no params)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, idim: int, hidden_units: int, activation: nn.Module, policy: Precision = EXACT):
        super().__init__()
        self.w_1 = policy.linear(idim, hidden_units, name="w_1")
        self.activation = activation
        self.w_2 = policy.linear(hidden_units, idim, name="w_2")

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class LayerCache:
    """Keys, values and linear_pos-projected relative positions (0, 1, 2, ...) of one layer.

    Buffers are preallocated and grown 128 frames at a time when full, so appending a frame rarely copies the
    history (a copy per 128 frames costs far less than the step itself; doubling would hold up to 2x the memory).
    """

    def __init__(self):
        self.k: Optional[Tensor] = None  # (B, H, capacity, d_k)
        self.v: Optional[Tensor] = None
        self.length = 0
        self.pos: Optional[Tensor] = None  # (capacity, D): linear_pos(encoding of relative position r) at row r
        self.pos_length = 0

    @staticmethod
    def _grow(buf: Optional[Tensor], used: int, need: int, dim: int, like: Tensor) -> Tensor:
        if buf is not None and buf.size(dim) >= need:
            return buf
        capacity = -(-need // 128) * 128
        shape = list(like.shape)
        shape[dim] = capacity
        new = like.new_empty(shape)
        if buf is not None and used:
            new.narrow(dim, 0, used).copy_(buf.narrow(dim, 0, used))
        return new

    def append_kv(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Store k, v (B, H, t, d_k) after the cached ones; return all keys and values (B, H, length, d_k), in the
        type of k and v (the batched decoder may have left the cache in float16: decode.lm_decoder._KVSlots)."""
        n, t = self.length, k.size(2)
        self.k = self._grow(self.k, n, n + t, 2, k)
        self.v = self._grow(self.v, n, n + t, 2, v)
        self.k[:, :, n:n + t] = k
        self.v[:, :, n:n + t] = v
        self.length = n + t
        return self.k[:, :, :n + t].to(k.dtype), self.v[:, :, :n + t].to(v.dtype)

    def append_pos(self, p: Tensor) -> Tensor:
        """Store projected positions p (m, D) for the next relative positions; return rows 0..pos_length-1."""
        n, m = self.pos_length, p.size(0)
        if m:
            self.pos = self._grow(self.pos, n, n + m, 0, p)
            self.pos[n:n + m] = p
            self.pos_length = n + m
        return self.pos[:self.pos_length]


class KVCache:
    """Decoding state of one sequence (batch 1 in practice) for every layer of an encoder."""

    def __init__(self, num_layers: int):
        self.layers: List[LayerCache] = [LayerCache() for _ in range(num_layers)]

    @property
    def offset(self) -> int:
        """Number of frames already processed (the position of the next frame)."""
        return self.layers[0].length


class RelPositionMultiHeadedAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (ESPnet 'rel_selfattn').

    score(i, j) = ((q_i + u) . k_j + (q_i + v) . W_pos pe(pos_i - pos_j)) / sqrt(d_k)

    decode.lm_decoder._int8_layers is the lean modes' batched copy of this maths (with the layer around it):
    a change here is a change there; tests/test_speed.py compares the two.
    """

    def __init__(self, n_head: int, n_feat: int, key_bias: bool = True, policy: Precision = EXACT):
        super().__init__()
        assert n_feat % n_head == 0, "attention width must be divisible by the number of heads"
        self.d_k = n_feat // n_head
        self.h = n_head
        # q, k and v in one (3 * n_feat, n_feat) projection, one matmul per call; the checkpoint's separate
        # linear_q/k/v keys are fused at load (fuse_qkv_keys), a key bias absent from it (key_bias=False) is zero.
        self.linear_qkv = policy.linear(n_feat, 3 * n_feat, name="linear_qkv")
        self.key_bias = key_bias
        self.linear_out = policy.linear(n_feat, n_feat, name="linear_out")
        self.linear_pos = policy.linear(n_feat, n_feat, bias=False, name="linear_pos")
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))

    def project_qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x (B, t, D) -> q (B, t, H, d_k), k and v (B, H, t, d_k)."""
        B, t, _ = x.shape
        q, k, v = self.linear_qkv(x).view(B, t, 3, self.h, self.d_k).unbind(2)
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, pos_emb: Optional[Tensor], mask: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None, new_pos: Optional[Tensor] = None) -> Tensor:
        """x (B, t, D) new frames.

        Without a cache, or for a multi-frame chunk, `pos_emb` (1, c+2t-1, D) holds the encodings of relative
        positions c+t-1 .. -(t-1), where c is the number of cached frames.
        For a single new frame with a cache, pass pos_emb=None and `new_pos` (m, D): encodings of the relative
        positions not yet projected in this cache (ascending); the projection is cached.
        mask: bool (B or 1, t, c+t), True = may attend; None = attend to everything.
        """
        B, t, _ = x.shape
        q, k, v = self.project_qkv(x)  # q (B, t, H, d_k); k, v (B, H, t, d_k)
        if cache is not None:
            k, v = cache.append_kv(k, v)  # (B, H, c+t, d_k)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, t, d_k)
        q_v = (q + self.pos_bias_v).transpose(1, 2)

        matrix_ac = torch.matmul(q_u, k.transpose(-2, -1))  # (B, H, t, c+t)
        if pos_emb is None:
            # one frame at position c: relative positions c, c-1, ..., 0 against keys 0..c
            p = cache.append_pos(self.linear_pos(new_pos))  # (c+1, D), rows = relative 0..c
            p = p.view(-1, self.h, self.d_k).transpose(0, 1)  # (H, c+1, d_k)
            matrix_bd = torch.matmul(q_v, p.transpose(-2, -1)).flip(-1)  # (B, H, 1, c+1)
        else:
            p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
            matrix_bd = torch.matmul(q_v, p.transpose(-2, -1))  # (B, H, t, c+2t-1)
            if matrix_bd.shape != matrix_ac.shape:
                matrix_bd = rel_shift(matrix_bd, matrix_ac.size(-1))
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)  # (B, H, t, c+t)

        if mask is not None:
            blocked = ~mask.unsqueeze(1)  # (B, 1, t, c+t)
            scores = scores.masked_fill(blocked, -float("inf"))
            attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v)  # (B, H, t, d_k)
        out = out.transpose(1, 2).contiguous().view(B, t, self.h * self.d_k)
        return self.linear_out(out)


def fuse_qkv_keys(module: nn.Module, state: dict, on_fused=None) -> dict:
    """Checkpoint key adapter: the official '<attn>.linear_{q,k,v}.{weight,bias}' of every attention block of
    `module` become '<attn>.linear_qkv.{weight,bias}' (rows q, k, v). on_fused(tensor) is called with each separate
    tensor once it is copied (the loader releases its mapped pages). Other keys pass through unchanged."""
    state = dict(state)
    for name, sub in module.named_modules():
        if not isinstance(sub, RelPositionMultiHeadedAttention):
            continue
        p = f"{name}." if name else ""
        weights = [state.get(f"{p}linear_{x}.weight") for x in "qkv"]
        if any(w is None for w in weights):
            continue  # not in the official layout: the strict load reports what is missing
        biases = [state.pop(f"{p}linear_{x}.bias", None) for x in "qkv"]
        biases = [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype) for b, w in zip(biases, weights)]
        for x in "qkv":
            del state[f"{p}linear_{x}.weight"]
        state[f"{p}linear_qkv.weight"] = torch.cat(weights, dim=0)
        state[f"{p}linear_qkv.bias"] = torch.cat(biases, dim=0)
        if on_fused is not None:
            for tensor in weights + biases:
                on_fused(tensor)
    return state


def split_qkv_keys(module: nn.Module, state: dict) -> dict:
    """The inverse of fuse_qkv_keys: our state dict in the official layout (for writing checkpoints)."""
    state = dict(state)
    for name, sub in module.named_modules():
        if not isinstance(sub, RelPositionMultiHeadedAttention):
            continue
        p = f"{name}." if name else ""
        weight, bias = state.pop(f"{p}linear_qkv.weight"), state.pop(f"{p}linear_qkv.bias")
        for x, w, b in zip("qkv", weight.chunk(3, dim=0), bias.chunk(3, dim=0)):
            state[f"{p}linear_{x}.weight"] = w.clone()
            if x != "k" or sub.key_bias:
                state[f"{p}linear_{x}.bias"] = b.clone()
    return state


def rel_shift(x: Tensor, n_keys: int) -> Tensor:
    """Turn scores against relative positions into scores against keys (Transformer-XL shift).

    x (B, H, t, P): scores of the t newest queries against relative positions n_keys-1 .. -(t-1) (descending,
    P = n_keys + t - 1). Query i (absolute position n_keys - t + i) meets key j at relative position
    n_keys - t + i - j, i.e. column t-1-i+j. Returns (B, H, t, n_keys) as a strided view of x.
    """
    B, H, t, P = x.shape
    x = x.contiguous()
    return x.as_strided((B, H, t, n_keys), (H * t * P, t * P, P - 1, 1), x.storage_offset() + t - 1)


class _EncoderLayer(nn.Module):
    """Self-attention block then feed-forward block, each with a residual connection."""

    norm_att: str
    norm_ffn: str

    def __init__(self, size: int, self_attn: nn.Module, feed_forward: nn.Module, normalize_before: bool):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        setattr(self, self.norm_att, nn.LayerNorm(size, eps=1e-12))
        setattr(self, self.norm_ffn, nn.LayerNorm(size, eps=1e-12))
        self.normalize_before = normalize_before

    def forward(self, x: Tensor, pos_emb: Optional[Tensor], mask: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None, new_pos: Optional[Tensor] = None) -> Tensor:
        norm_att, norm_ffn = getattr(self, self.norm_att), getattr(self, self.norm_ffn)
        if self.normalize_before:
            x = x + self.self_attn(norm_att(x), pos_emb, mask, cache, new_pos)
            x = x + self.feed_forward(norm_ffn(x))
        else:
            x = norm_att(x + self.self_attn(x, pos_emb, mask, cache, new_pos))
            x = norm_ffn(x + self.feed_forward(x))
        return x


class TransformerEncoderLayer(_EncoderLayer):
    norm_att, norm_ffn = "norm1", "norm2"


class ConformerEncoderLayer(_EncoderLayer):
    """Conformer layer without the convolution module and without macaron feed-forward (v1 configs)."""
    norm_att, norm_ffn = "norm_mha", "norm_ff"


class BaseEncoder(nn.Module):
    layer_class = TransformerEncoderLayer

    def __init__(self, input_size: int, output_size: int, attention_heads: int, linear_units: int,
                 num_blocks: int, input_layer: str, pos_enc_layer_type: str, normalize_before: bool,
                 static_chunk_size: int, use_dynamic_chunk: bool, selfattention_layer_type: str,
                 activation_type: str, key_bias: bool, policy: Precision = EXACT):
        super().__init__()
        if input_layer not in ("linear", "linear_legacy"):
            raise NotImplementedError(f"input_layer {input_layer!r} is not supported (only 'linear', 'linear_legacy')")
        if pos_enc_layer_type != "rel_pos_espnet":
            raise NotImplementedError(f"pos_enc_layer_type {pos_enc_layer_type!r} is not supported "
                                      "(only 'rel_pos_espnet')")
        if selfattention_layer_type != "rel_selfattn":
            raise NotImplementedError(f"selfattention_layer_type {selfattention_layer_type!r} is not supported "
                                      "(only 'rel_selfattn')")
        if activation_type not in ACTIVATIONS:
            raise NotImplementedError(f"activation_type {activation_type!r} is not supported")
        self._output_size = output_size
        self.static_chunk_size = static_chunk_size
        self.use_dynamic_chunk = use_dynamic_chunk
        self.embed = LinearNoSubsampling(input_size, output_size, legacy=input_layer == "linear_legacy",
                                         policy=policy.at("embed"))
        self.pos_enc = EspnetRelPositionalEncoding(output_size)
        layers = [policy.at(f"encoders.{i}") for i in range(num_blocks)]
        self.encoders = nn.ModuleList([
            self.layer_class(
                output_size,
                RelPositionMultiHeadedAttention(attention_heads, output_size, key_bias, layer.at("self_attn")),
                PositionwiseFeedForward(output_size, linear_units, ACTIVATIONS[activation_type](),
                                        layer.at("feed_forward")),
                normalize_before,
            )
            for layer in layers
        ])
        self.normalize_before = normalize_before
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def output_size(self) -> int:
        return self._output_size

    def _chunk_size(self, decoding_chunk_size: int) -> int:
        """Attention chunk size; 0 = full attention."""
        if self.use_dynamic_chunk:
            if decoding_chunk_size == 0:
                raise NotImplementedError("use_dynamic_chunk with decoding_chunk_size 0 draws a random "
                                          "(training) chunk size; pass decoding_chunk_size > 0 or < 0")
            return max(decoding_chunk_size, 0)
        return self.static_chunk_size

    def forward(self, xs: Tensor, xs_lens: Optional[Tensor] = None, decoding_chunk_size: int = 0,
                num_decoding_left_chunks: int = -1) -> Tuple[Tensor, Tensor]:
        """xs (B, T, input_size), xs_lens (B,) -> (out (B, T, D), valid-frame mask (B, 1, T) bool).

        decoding_chunk_size only matters for use_dynamic_chunk models (static chunking is fixed by the config);
        num_decoding_left_chunks is accepted for interface compatibility (the official ignores it too).
        """
        B, T, _ = xs.shape
        if xs_lens is None:
            masks = torch.ones(B, 1, T, dtype=torch.bool, device=xs.device)
        else:
            masks = torch.arange(T, device=xs.device).unsqueeze(0) < xs_lens.to(xs.device).unsqueeze(1)
            masks = masks.unsqueeze(1)  # (B, 1, T)
        chunk = self._chunk_size(decoding_chunk_size)
        if chunk > 0:
            att_mask = masks & chunk_mask(T, chunk, device=xs.device).unsqueeze(0)  # (B, T, T)
            att_mask[~att_mask.any(-1)] = True  # rows with nothing visible (padding) attend anywhere, like the official
        elif xs_lens is not None:
            att_mask = masks  # (B, 1, T) padding only
        else:
            att_mask = None

        xs = self.embed(xs) * self.pos_enc.xscale  # (B, T, D)
        pos_emb = self.pos_enc.rows(T - 1, -(T - 1), xs)  # (1, 2T-1, D)
        for layer in self.encoders:
            xs = layer(xs, pos_emb, att_mask)
        if self.normalize_before:
            xs = self.after_norm(xs)
        return xs, masks

    def new_cache(self) -> KVCache:
        return KVCache(len(self.encoders))

    def forward_chunk(self, xs: Tensor, cache: KVCache) -> Tensor:
        """Run new frames xs (1, t, input_size) after the frames already in `cache`; returns (1, t, D).

        The cache is updated in place. Attention follows static_chunk_size: when > 0 a
        frame sees keys up to the end of its chunk (causal for chunk size 1), otherwise all cached and new frames.
        A single new frame never needs a mask: it sees all cached frames and itself.
        """
        c, t = cache.offset, xs.size(1)
        xs = self.embed(xs) * self.pos_enc.xscale  # (1, t, D)
        if t == 1:
            pos_len = cache.layers[0].pos_length
            new_pos = self.pos_enc.rows(c, pos_len, xs)[0].flip(0)  # relative positions pos_len .. c, ascending
            for layer, layer_cache in zip(self.encoders, cache.layers):
                xs = layer(xs, None, None, layer_cache, new_pos)
        else:
            pos_emb = self.pos_enc.rows(c + t - 1, -(t - 1), xs)  # (1, c+2t-1, D)
            mask = None
            chunk = self.static_chunk_size
            if chunk > 0:
                query_pos = torch.arange(c, c + t, device=xs.device).unsqueeze(1)  # (t, 1)
                key_pos = torch.arange(c + t, device=xs.device).unsqueeze(0)  # (1, c+t)
                mask = (key_pos < (query_pos // chunk + 1) * chunk).unsqueeze(0)  # (1, t, c+t)
            for layer, layer_cache in zip(self.encoders, cache.layers):
                xs = layer(xs, pos_emb, mask, layer_cache)
        if self.normalize_before:
            xs = self.after_norm(xs)
        return xs


def chunk_mask(size: int, chunk_size: int, device=None) -> Tensor:
    """(size, size) bool: frame i may attend to frames before the end of its chunk."""
    pos = torch.arange(size, device=device)
    chunk_end = (pos // chunk_size + 1) * chunk_size
    return pos.unsqueeze(0) < chunk_end.unsqueeze(1)


class TransformerEncoder(BaseEncoder):
    """Transformer encoder (layers: norm1 -> attention, norm2 -> feed-forward); the v1 LM."""
    layer_class = TransformerEncoderLayer

    def __init__(self, input_size: int, output_size: int = 256, attention_heads: int = 4,
                 linear_units: int = 2048, num_blocks: int = 6, input_layer: str = "conv2d",
                 pos_enc_layer_type: str = "abs_pos", normalize_before: bool = True, static_chunk_size: int = 0,
                 use_dynamic_chunk: bool = False, key_bias: bool = True,
                 selfattention_layer_type: str = "selfattn", activation_type: str = "relu",
                 policy: Precision = EXACT):
        super().__init__(input_size, output_size, attention_heads, linear_units, num_blocks, input_layer,
                         pos_enc_layer_type, normalize_before, static_chunk_size, use_dynamic_chunk,
                         selfattention_layer_type, activation_type, key_bias, policy)


class ConformerEncoder(BaseEncoder):
    """Conformer encoder as configured in v1 (no convolution module, no macaron feed-forward): the LLM's text
    encoder and the flow's token encoder. Layers: norm_mha -> attention, norm_ff -> feed-forward."""
    layer_class = ConformerEncoderLayer

    def __init__(self, input_size: int, output_size: int = 256, attention_heads: int = 4,
                 linear_units: int = 2048, num_blocks: int = 6, input_layer: str = "conv2d",
                 pos_enc_layer_type: str = "rel_pos", normalize_before: bool = True, static_chunk_size: int = 0,
                 use_dynamic_chunk: bool = False, macaron_style: bool = True,
                 selfattention_layer_type: str = "rel_selfattn", activation_type: str = "swish",
                 use_cnn_module: bool = True, key_bias: bool = True, policy: Precision = EXACT):
        if use_cnn_module:
            raise NotImplementedError("ConformerEncoder: use_cnn_module=True (convolution module) is not "
                                      "supported; CosyVoice v1 configs set use_cnn_module: False")
        if macaron_style:
            raise NotImplementedError("ConformerEncoder: macaron_style=True (second feed-forward) is not "
                                      "supported; CosyVoice v1 configs set macaron_style: False")
        super().__init__(input_size, output_size, attention_heads, linear_units, num_blocks, input_layer,
                         pos_enc_layer_type, normalize_before, static_chunk_size, use_dynamic_chunk,
                         selfattention_layer_type, activation_type, key_bias, policy)
