"""Token-by-token decoding of the TransformerLM for many sequences at once.

A `Sequence` is one request's decoding state (KV cache, tokens so far, length limits, its own RNG). `LMDecoder.step`
advances any number of sequences by one token:

- exact mode: each sequence runs `TransformerLM.step` on its own, exactly like the official decoding loop (same
  numerics and, with no per-request generator, the same draws from the global RNG);
- other modes (int8 LM layers): the new frames of all sequences go through every linear layer together (one weight
  read per token step, whatever the number of sequences); only attention runs per sequence, against its own cache.
  Relative-position projections are shared: ``linear_pos`` of relative position r is the same for every
  sequence, so each layer keeps one table of them, extended in blocks.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

from ..memory import discard, lazy_empty
from ..model.layers import Int8Linear
from ..model.transformer import KVCache

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    cache: KVCache
    prefix: Optional[Tensor]          # (1, P, D) LM input before the first step; None afterwards
    min_len: int
    max_len: int
    sampling: Dict
    generator: Optional[torch.Generator] = None
    decoded: List[int] = field(default_factory=list)
    finished: bool = False
    on_logits: Optional[Callable[[int, Tensor], None]] = None  # (step, raw logits (1, V+1)), for inspection
    slots: Optional["_KVSlots"] = None  # the cache as the batched step writes it (made at its first batched step)

    @property
    def steps(self) -> int:
        return len(self.decoded)


class PositionTable:
    """Per LM layer: linear_pos(encoding of relative position r) for r = C-1, ..., 1, 0 (descending), (H, C, d_k).

    Descending order makes the rows for a query at position n-1 a plain slice: key j meets relative position
    n-1-j, i.e. the last n rows; with r before d_k, that slice is per head a block of whole rows, which a batched
    matmul reads in place (transposed, like the keys). The tables of all layers are views of one block with room
    for the C rows the sequences in progress may reach, reserved unwritten (memory.lazy_empty): rows are projected
    in blocks as the sequences get longer, for all layers at once (they are always asked for the same lengths),
    filling each table from its end. So its resident memory follows the longest sequence, and growing copies
    nothing (a new block, only when a sequence may reach past C). When the sequences in progress need less than
    half of the rows filled, and when the decoder is idle, the rows past KEEP are given back (their pages
    discarded): a long request would otherwise leave a table as large as its keys and values for the worker's life.
    The rows are kept in the decoder's ``dtype``, as its keys and values are (float16 halves what they hold and what
    a step reads; attention converts them to float32).
    """

    BLOCK = 128
    KEEP = 4 * BLOCK  # rows never given back: the positions of an ordinary sentence

    def __init__(self, encoder, dtype: torch.dtype = torch.float32):
        self.encoder = encoder
        self.dtype = dtype
        self._held = (0, [])  # (rows filled, tables): one attribute, so that a shrink is never seen half

    @property
    def size(self) -> int:
        """Rows filled: relative positions size-1 .. 0."""
        return self._held[0]

    def reserve(self, n: int, room: int = 0) -> List[Tensor]:
        """The tables of all layers, each (H, C, d_k) with its last n or more rows filled; C >= ``room`` when a new
        block is made (the rows the sequences in progress may reach)."""
        filled, tables = self._held
        size = self._blocks(n)
        if filled < n:
            if not tables or size > tables[0].size(1):
                tables = self._allocate(max(size, self._blocks(room)), tables, filled)
            self._fill(tables, filled, size)
            self._held = (size, tables)
        elif filled > max(2 * size, self.KEEP):
            tables = self.shrink(max(size, self.KEEP))
        return tables

    def shrink(self, size: Optional[int] = None) -> List[Tensor]:
        """Keep the rows of relative positions size-1 .. 0 only (default: KEEP), the last rows of each table;
        returns the tables held afterwards."""
        size = self.KEEP if size is None else size
        filled, tables = self._held
        if filled > size:
            self._held = (size, tables)
            for table in tables:
                for head in table:  # (C, d_k): the rows before the last `size` are no longer filled
                    discard(head[:head.size(0) - size])
        return tables

    def _blocks(self, n: int) -> int:
        return -(-n // self.BLOCK) * self.BLOCK

    def _allocate(self, capacity: int, old: List[Tensor], filled: int) -> List[Tensor]:
        attn = self.encoder.encoders[0].self_attn
        block = lazy_empty((len(self.encoder.encoders), attn.h, capacity, attn.d_k), self.dtype)
        tables = list(block.unbind(0))
        for table, previous in zip(tables, old):
            table[:, capacity - filled:] = previous[:, previous.size(1) - filled:]
        return tables

    def _fill(self, tables: List[Tensor], filled: int, size: int) -> None:
        """Project the rows of relative positions size-1 .. filled, stored before the rows already filled."""
        pe = self.encoder.pos_enc.rows(size - 1, filled, torch.empty(0))[0]  # (size - filled, D), r descending
        capacity = tables[0].size(1)
        for layer, table in zip(self.encoder.encoders, tables):
            self._project(layer.self_attn, pe, out=table[:, capacity - size:capacity - filled])

    @staticmethod
    def _project(attn, pe: Tensor, out: Tensor) -> None:
        out.copy_(attn.linear_pos(pe).view(pe.size(0), attn.h, attn.d_k).transpose(0, 1))


class LMDecoder:
    def __init__(self, llm, batched: bool, scripted: bool = True, kv_dtype: torch.dtype = torch.float32):
        """``batched``: step the sequences together through ``_int8_layers`` when the LM's layers are int8 (the
        lean modes); otherwise each sequence steps through the LM module on its own. ``scripted``: run
        ``_int8_layers`` compiled by TorchScript (False: the same function from Python). ``kv_dtype``: the type
        the batched step keeps keys and values in (attention itself runs in float32)."""
        self.llm = llm
        self.batched = batched
        self.scripted = scripted
        self.kv_dtype = kv_dtype
        self.positions = PositionTable(llm.llm, kv_dtype) if batched else None
        self._stack: Optional[_Int8Stack] = None

    @classmethod
    def for_model(cls, model, **options) -> "LMDecoder":
        """The decoder a loaded CosyVoiceSFT runs in its mode: batched steps and the KV dtype from ``model.mode``."""
        mode = model.mode
        return cls(model.llm, batched=mode.batched,
                   kv_dtype=torch.float16 if mode.kv_cache == "fp16" else torch.float32, **options)

    @torch.inference_mode()
    def start(self, text_token: Tensor, embedding: Optional[Tensor], min_token_text_ratio: float = 2,
              max_token_text_ratio: float = 20, sampling: Optional[Dict] = None,
              generator: Optional[torch.Generator] = None, on_logits=None, prompt_text: Optional[Tensor] = None,
              prompt_speech: Optional[Tensor] = None) -> Sequence:
        """A new sequence for text_token (1, L) and a raw speaker embedding (1, spk_embed_dim) or None. EOS cannot
        be drawn before int(L * min_token_text_ratio) tokens; at most int(L * max_token_text_ratio) are decoded;
        ``sampling`` overrides the yaml's ras_sampling arguments; without ``generator`` draws use torch's global
        RNG (as the official code does). prompt_text (1, Lp) and prompt_speech (1, Np) tokens make the prefix a
        prompt to continue (TransformerLM.prefix); L, for the length limits, is the target text's alone, as in
        the official code."""
        min_len, max_len = self.llm.length_limits(text_token.size(1), min_token_text_ratio, max_token_text_ratio)
        prefix = self.llm.prefix(text_token, embedding, prompt_text, prompt_speech)
        return Sequence(self.llm.new_cache(), prefix, min_len, max_len,
                        {**self.llm.sampling, **(sampling or {})}, generator, finished=max_len <= 0,
                        on_logits=on_logits)

    def release_idle(self) -> None:
        """No sequence in progress: give back what long ones grew (see PositionTable)."""
        if self.positions is not None:
            self.positions.shrink()

    def tokens(self, seq: Sequence) -> Iterator[int]:
        """Decode one sequence to its end, yielding each speech token as it is drawn."""
        while not seq.finished:
            token = self.step([seq])[0]
            if token is not None:
                yield token

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
        if old and self.batched and self._layer_stack() is not None:
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
                if s.on_logits is not None:
                    s.on_logits(s.steps, logits[i:i + 1])
                token = self.llm.choose(logits[i:i + 1], s.decoded, allow_eos=s.steps >= s.min_len,
                                        sampling=s.sampling, generator=s.generator)
                tokens[id(s)] = self.push(s, token)
        return [tokens.get(id(s)) for s in seqs]

    @torch.inference_mode()
    def greedy(self, text_token: Tensor, embedding: Optional[Tensor], n: int,
               forced: Optional[List[int]] = None, prompt_text: Optional[Tensor] = None,
               prompt_speech: Optional[Tensor] = None) -> tuple:
        """n argmax tokens (EOS excluded) and the raw logits (n, V+1) before each: the quality guard of the fast
        modes. With `forced` (n tokens), those tokens are fed instead (teacher forcing) and returned. A prompt
        (see start) conditions them as in zero-shot and instruct synthesis."""
        s = self.start(text_token, embedding, min_token_text_ratio=0, max_token_text_ratio=10 ** 6,
                       prompt_text=prompt_text, prompt_speech=prompt_speech)
        rows = []
        for i in range(n):
            logits = self.logits([s])
            rows.append(logits)
            self.push(s, forced[i] if forced is not None else int(logits[0, :self.llm.eos_token].argmax()))
        return list(s.decoded), torch.cat(rows, dim=0)

    def _last_input(self, s: Sequence) -> Tensor:
        return self.llm.speech_embedding(torch.tensor([s.decoded[-1]])).reshape(1, 1, -1)

    def _layer_stack(self) -> Optional["_Int8Stack"]:
        if self._stack is None and self.batched:
            self._stack = _Int8Stack.of(self.llm.llm.encoders, self.scripted)
            if self._stack is None:  # a float LM (no mode builds one batched): the module path, per sequence
                self.batched = False
        return self._stack

    def _batched_step(self, seqs: List[Sequence]) -> Tensor:
        """One new frame for each sequence (all past their prefix) -> raw logits (B, V+1).

        Written for the per-token cost on a CPU, where a step of one sequence is ~1000 small calls: 2-D (B, D)
        activations, the layer stack in one call (see _int8_layers), each sequence's new key and value stored with
        one copy, and its attention in three small batched matmuls over heads.
        """
        enc = self.llm.llm
        slots = [_KVSlots.of(s, self.kv_dtype) for s in seqs]
        # cached frames per sequence (the new one goes at index n); a sequence adds at most max_len - steps + 1
        lengths = [slot.reserve(s.max_len - s.steps + 1) for slot, s in zip(slots, seqs)]
        tables = self.positions.reserve(max(lengths) + 1, room=max(slot.capacity for slot in slots))
        tokens = torch.tensor([s.decoded[-1] for s in seqs])
        x = enc.embed(self.llm.speech_embedding(tokens)) * enc.pos_enc.xscale  # (B, D)
        x = self._stack(x, [[slot.views[i] for slot in slots] for i in range(len(tables))], tables, lengths)
        for slot, n in zip(slots, lengths):
            slot.advance(n + 1)
        return self.llm.llm_decoder(enc.after_norm(x))  # (B, V+1)


class _KVSlots:
    """A sequence's keys and values as the batched step writes them: per layer a buffer (2, H, capacity, d_k)
    whose halves are the LayerCache's k and v (views, so the cache stays what `KVCache` says it is), all layers'
    buffers in one block, in the decoder's ``kv_dtype``: float16 halves what a long sequence holds (its keys and
    values are most of a worker's serving memory beyond the weights); attention reads them back as float32.

    One buffer per layer lets a step store a frame's key and value with a single copy, and the per-layer views are
    made when the buffers are (re)allocated, not at every step. The buffers have room for every frame the
    sequence may still add (at most AHEAD), reserved unwritten when its first batched step meets it
    (memory.lazy_empty): its memory grows with the frames written, and the cache is never copied to grow, which
    held it twice for a moment (four long sequences growing at once added their caches again to a worker's peak).
    """

    BLOCK = 32
    AHEAD = 4096  # most frames reserved past the cached ones (a check may decode without a length limit)

    def __init__(self, cache: KVCache, dtype: torch.dtype):
        self.cache = cache
        self.dtype = dtype
        self.capacity = 0
        self.views: List[Tensor] = []  # per layer: kv (2, H, cap, d_k), keys then values
        self.first_k: Optional[Tensor] = None  # layer 0's cache.k as set here

    @staticmethod
    def of(s: Sequence, dtype: torch.dtype) -> "_KVSlots":
        if s.slots is None:
            s.slots = _KVSlots(s.cache, dtype)
        return s.slots

    def reserve(self, ahead: int = 1) -> int:
        """Number of cached frames n; makes room for one more. Reallocates, with room for n + ``ahead`` frames,
        when full, or when the cache's buffers are no longer ours (written by another path since)."""
        layers = self.cache.layers
        n = layers[0].length
        if n >= self.capacity or layers[0].k is not self.first_k:
            self.capacity = ((n + max(1, min(ahead, self.AHEAD)) - 1) // self.BLOCK + 1) * self.BLOCK
            self.views = self._reallocate(layers, self.capacity, self.dtype)
            self.first_k = layers[0].k
        return n

    def advance(self, length: int):
        for layer in self.cache.layers:
            layer.length = length

    @staticmethod
    def _reallocate(layers, capacity: int, dtype: torch.dtype) -> List[Tensor]:
        """Move every layer's n cached frames into one new (layers, 2, 1, H, capacity, d_k) block; each cache.k/v
        becomes a view of it. One block for all layers is large enough to be a mapping of its own
        (memory.map_large_blocks): the block it replaces is unmapped when freed, where per-layer buffers would stay
        in the heap as freed garbage (four sequences growing at once left ~100 MB of it until the next trim)."""
        n, (_, H, _, d_k) = layers[0].length, layers[0].k.shape
        block = lazy_empty((len(layers), 2, 1, H, capacity, d_k), dtype)
        views = []
        for layer, kv in zip(layers, block):
            kv[0, :, :, :n] = layer.k[:, :, :n]
            kv[1, :, :, :n] = layer.v[:, :, :n]
            layer.k, layer.v = kv[0], kv[1]  # (1, H, capacity, d_k)
            views.append(kv[:, 0])
        return views


def _int8_layers(x: Tensor, norms: List[Tensor], packs: List[torch.classes.quantized.LinearPackedParamsBase],
                 biases: List[Tensor], views: List[List[Tensor]], tables: List[Tensor], lengths: List[int],
                 heads: int, d_k: int, scale: float, eps: float) -> Tensor:
    """The LM's pre-norm layers (transformer.TransformerEncoderLayer) for one new frame of each of B sequences,
    int8 linears with ReLU, written for TorchScript; x (B, D) -> (B, D). Per layer i: norms[4i:4i+4] = norm1 w, b,
    norm2 w, b; packs[4i:4i+4] = qkv, out, w_1, w_2; biases[2i:2i+2] = pos_bias_u, pos_bias_v (H, 1, d_k);
    views[i] = per sequence its kv (see _KVSlots), where its new key and value go at index lengths[b]; tables[i]
    = that layer's PositionTable (H, R, d_k).

    The maths of transformer.TransformerEncoderLayer with a cache, kept as a second copy for speed: stepping each
    sequence through the modules costs ~1.4x per token alone and ~4x for four sequences (full-size LM, int8).
    Scores are scaled inside baddbmm, so the rounding differs from the module's (exact mode runs the module)."""
    B, D = x.size(0), heads * d_k
    # float16 position rows, keys, then values, are converted into one float32 buffer shared by all layers and
    # sequences: it stays in cache between its write and its read, where a fresh copy per tensor costs an allocation
    # and memory traffic. (empty when the cache and the table are float32: nothing to convert)
    converted = views[0][0].dtype != torch.float32
    rows_converted = tables[0].dtype != torch.float32
    scratch = x.new_empty(heads, max(lengths) + 1 if converted or rows_converted else 0, d_k)
    attended = x.new_empty(B, heads, 1, d_k)
    for i in range(len(tables)):
        h = torch.layer_norm(x, [D], norms[4 * i], norms[4 * i + 1], eps)
        qkv = torch.ops.quantized.linear_dynamic(h, packs[4 * i], True)  # (B, 3D)
        q = qkv.narrow(1, 0, D).view(B, heads, 1, d_k)
        q_u, q_v = q + biases[2 * i], q + biases[2 * i + 1]
        new = qkv.narrow(1, D, 2 * D).view(B, 2, heads, d_k)
        table = tables[i]
        R = table.size(1)
        for b in range(B):
            n = lengths[b]
            kv = views[i][b]
            kv.select(2, n).copy_(new[b])
            keys, values = kv[0].narrow(1, 0, n + 1), kv[1].narrow(1, 0, n + 1)
            # (H, 1, d_k) @ (H, d_k, n+1): the transposed rows of the table and keys are read in place
            rows = table.narrow(1, R - n - 1, n + 1)
            if rows_converted:
                rows = scratch.narrow(1, 0, n + 1).copy_(rows)
            scores = torch.bmm(q_v[b], rows.transpose(1, 2))
            if converted:
                keys = scratch.narrow(1, 0, n + 1).copy_(keys)
            scores = torch.baddbmm(scores, q_u[b], keys.transpose(1, 2), beta=scale, alpha=scale)
            weights = torch.softmax(scores, dim=-1)
            if converted:
                values = scratch.narrow(1, 0, n + 1).copy_(values)
            torch.bmm(weights, values, out=attended[b])
        x = x + torch.ops.quantized.linear_dynamic(attended.view(B, D), packs[4 * i + 1], True)
        h = torch.layer_norm(x, [D], norms[4 * i + 2], norms[4 * i + 3], eps)
        h = torch.ops.quantized.linear_relu_dynamic(h, packs[4 * i + 2], True)
        x = x + torch.ops.quantized.linear_dynamic(h, packs[4 * i + 3], True)
    return x


class _Int8Stack:
    """The LM's layers as arguments of ``_int8_layers`` (collected once), and that function, scripted or not."""

    @classmethod
    def of(cls, layers, scripted: bool = True) -> Optional["_Int8Stack"]:
        """None unless every layer has int8 q/k/v, output and feed-forward layers with a ReLU between."""
        for layer in layers:
            attn, ff = layer.self_attn, layer.feed_forward
            if not (all(isinstance(m, Int8Linear) for m in (attn.linear_qkv, attn.linear_out, ff.w_1, ff.w_2))
                    and isinstance(ff.activation, nn.ReLU)):
                return None
        return cls(layers, _scripted() if scripted else _int8_layers)

    def __init__(self, layers, function):
        self.function = function
        attn = layers[0].self_attn
        self.norms = [t for layer in layers for norm in (layer.norm1, layer.norm2) for t in (norm.weight, norm.bias)]
        self.packs = [m.packed() for layer in layers for m in (layer.self_attn.linear_qkv, layer.self_attn.linear_out,
                                                                layer.feed_forward.w_1, layer.feed_forward.w_2)]
        self.biases = [b.unsqueeze(1) for layer in layers
                       for b in (layer.self_attn.pos_bias_u, layer.self_attn.pos_bias_v)]  # (H, 1, d_k)
        self.heads, self.d_k, self.scale = attn.h, attn.d_k, 1.0 / math.sqrt(attn.d_k)
        self.eps = layers[0].norm1.eps

    def __call__(self, x: Tensor, views: List[List[Tensor]], tables: List[Tensor], lengths: List[int]) -> Tensor:
        return self.function(x, self.norms, self.packs, self.biases, views, tables, lengths, self.heads, self.d_k,
                             self.scale, self.eps)


_SCRIPTED: list = []


def _scripted():
    """_int8_layers compiled by TorchScript once per process (no interpreter between its ~400 small ops), or the
    plain function on a torch without TorchScript."""
    if not _SCRIPTED:
        try:
            with warnings.catch_warnings():  # deprecated in favour of torch.compile, which needs a C++
                warnings.simplefilter("ignore", DeprecationWarning)  # compiler at run time: not in our image
                _SCRIPTED.append(torch.jit.script(_int8_layers))
        except Exception as error:
            log.warning("TorchScript unavailable, the LM step runs its layers from Python (%s)", error)
            _SCRIPTED.append(_int8_layers)
    return _SCRIPTED[0]
