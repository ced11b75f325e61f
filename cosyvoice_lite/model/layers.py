"""The reduced-precision and time-major layers a precision policy (``precision.py``) builds in place of nn layers.

Each stands for one nn layer (nn.Linear, nn.Conv1d, nn.ConvTranspose1d, nn.Embedding) and loads that layer's
official float32 checkpoint keys (``weight``, ``bias``: same names and shapes), converting them while the state
dict is loaded. With memory-mapped checkpoints the mapped pages of each float32 tensor are given back as soon as
its converted form exists, so a model is converted one layer at a time.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mapping import file_location, release_pages


class NonFiniteWeight(ValueError):
    """A float32 checkpoint tensor holds NaN or infinite values (found while converting it)."""

    def __init__(self, key: str):
        super().__init__(f"{key} has NaN or infinite values")
        self.key = key


class Float32Checkpoint(nn.Module):
    """Base of the layers whose checkpoint form is the float32 ``weight`` (and ``bias``) of an nn layer.

    ``checkpoint_shapes()`` names those keys and shapes; ``convert(weight, bias)`` builds the layer's own form
    from them. Strict ``load_state_dict`` reports missing and unexpected keys and shape mismatches as for the nn
    layer. ``state_dict()`` gives the layer's own form (it is not meant to be saved).
    """

    def checkpoint_shapes(self) -> Dict[str, Tuple[int, ...]]:
        raise NotImplementedError

    def convert(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        shapes = self.checkpoint_shapes()
        given = {}
        for name, shape in shapes.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
            elif tuple(state_dict[key].shape) != shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(state_dict[key].shape)} from checkpoint, the shape in current model is "
                                  f"{shape}.")
            else:
                given[name] = state_dict[key]
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in shapes)
        if len(given) < len(shapes):
            return
        for name, tensor in given.items():  # checked in float32: a float16 copy could overflow where it did not
            if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
                raise NonFiniteWeight(prefix + name)
        with torch.no_grad():
            self.convert(given["weight"], given.get("bias"))
        for tensor in given.values():  # the float32 form is not needed any more
            release_pages(tensor)


def own_bias(bias: Optional[Tensor]) -> Optional[Tensor]:
    """A float32 copy of a bias for fbgemm's packed layers: they keep the tensor they are given, and one that lives
    in a memory-mapped checkpoint would keep the mapping in use (see mapping.copy_out_of_mappings)."""
    return None if bias is None else bias.detach().float().clone()


def per_channel_int8(weight: Tensor):
    """Symmetric int8 quantization with one scale per output channel (dim 0)."""
    weight = weight.detach().float()
    scale = (weight.abs().flatten(1).amax(dim=1) / 127).clamp(min=1e-12).double()
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; the fbgemm kernels are current
        warnings.simplefilter("ignore")
        return torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.int64), 0, torch.qint8)


class _PackedLinear(Float32Checkpoint):
    """A linear layer whose weights fbgemm holds packed (``_packed``, set when a checkpoint is loaded)."""

    kind = ""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self._packed = None

    def checkpoint_shapes(self):
        shapes = {"weight": (self.out_features, self.in_features)}
        return {**shapes, "bias": (self.out_features,)} if self.has_bias else shapes

    def packed(self):
        if self._packed is None:
            raise RuntimeError(f"{type(self).__name__} has no weights yet: load a state dict into it first")
        return self._packed

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, {self.kind}"


class Int8Linear(_PackedLinear):
    """y = x W^T + b with W stored as int8 (symmetric, one scale per output row) in fbgemm's packed layout.

    Activations are quantized per call to 7-bit unsigned (fbgemm's AVX2 kernels need the reduced range to avoid
    16-bit saturation); accumulation is int32 and the result float32.
    """

    kind = "int8"

    def convert(self, weight, bias):
        self._packed = torch.ops.quantized.linear_prepack(per_channel_int8(weight), own_bias(bias))

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed(), True)


class Fp16Linear(_PackedLinear):
    """y = x W^T + b with W stored as float16 (fbgemm packed); activations and accumulation stay float32: half the
    bytes of float32, and only the weights' rounding as error."""

    kind = "fp16"

    def convert(self, weight, bias):
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), own_bias(bias))

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed())


class _Conv(Float32Checkpoint):
    """What a 1-D convolution is: sizes, strides and the shape of its float32 checkpoint weight."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True, transposed: bool = False,
                 output_padding: int = 0):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kernel_size,)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.has_bias, self.transposed, self.output_padding = bias, transposed, output_padding

    def checkpoint_shapes(self):
        # nn.ConvTranspose1d's weight is (C_in, C_out / groups, k), nn.Conv1d's (C_out, C_in / groups, k)
        if self.transposed:
            shapes = {"weight": (self.in_channels, self.out_channels // self.groups, self.kernel_size[0])}
        else:
            shapes = {"weight": (self.out_channels, self.in_channels // self.groups, self.kernel_size[0])}
        return {**shapes, "bias": (self.out_channels,)} if self.has_bias else shapes


class Int8Conv1d(_Conv):
    """Conv1d with int8 weights (one scale per output channel) run by fbgemm's dynamic quantized convolution:
    the input is quantized per call (7-bit, per tensor)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self._packed = None

    def convert(self, weight, bias):
        self._packed = torch.ops.quantized.conv1d_prepack(per_channel_int8(weight), own_bias(bias), [self.stride],
                                                          [self.padding], [self.dilation], self.groups)

    def forward(self, x: Tensor) -> Tensor:
        if self._packed is None:
            raise RuntimeError("Int8Conv1d has no weights yet: load a state dict into it first")
        return torch.ops.quantized.conv1d_dynamic(x, self._packed, True)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, int8"


class TimeMajorConv1d(_Conv):
    """Conv1d / ConvTranspose1d run as a 2-D convolution on channels-last (time-major) tensors.

    A (B, C, T) tensor whose memory is laid out (B, T, C) is, seen as (B, C, 1, T), channels-last: oneDNN's direct
    kernels are faster in that layout than on (B, C, T) memory for long 128/256-channel sequences. The output keeps
    the time-major layout, and elementwise operations keep the layout of their input, so a stack of these converts
    the input once. Same arithmetic up to float rounding. Any input layout is accepted.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True, transposed: bool = False,
                 output_padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, transposed,
                         output_padding)
        shape = self.checkpoint_shapes()["weight"]
        weight = torch.empty(shape[0], shape[1], 1, shape[2], memory_format=torch.channels_last)
        # (C_out, C_in/g, 1, k); transposed (C_in, C_out/g, 1, k)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_channels), requires_grad=False) if bias else None

    def convert(self, weight, bias):
        self.weight = nn.Parameter(weight.detach().float().unsqueeze(2).clone(memory_format=torch.channels_last),
                                   requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.unsqueeze(2)  # (B, C, 1, T)
        if self.transposed:
            y = F.conv_transpose2d(x, self.weight, self.bias, (1, self.stride), (0, self.padding),
                                   (0, self.output_padding), self.groups, (1, self.dilation))
        else:
            y = F.conv2d(x, self.weight, self.bias, (1, self.stride), (0, self.padding), (1, self.dilation),
                         self.groups)
        return y.squeeze(2)  # (B, C_out, T'), memory (B, T', C_out)

    def extra_repr(self) -> str:
        kind = "transposed, " if self.transposed else ""
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, {kind}time-major"


class FileEmbedding(Float32Checkpoint):
    """An embedding table read from the checkpoint file at each lookup (its float32 rows, with pread) instead of
    held in memory. For tables of which a lookup needs a few rows (per text, per token step, per chunk): they then
    cost no resident memory; the file's pages stay in the OS's page cache. Reads go through a file descriptor, not
    a mapping, so a checkpoint replaced in place while the service runs gives a clear error instead of a crash. A
    table not mapped from a file when loaded (a plain torch.load) is kept as a float32 copy."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.table: Optional[Tensor] = None  # the in-memory fallback
        self._fd: Optional[int] = None
        self._offset = 0
        self._identity = None  # (inode, size, mtime) of the file when loaded
        self._path = ""

    def checkpoint_shapes(self):
        return {"weight": (self.num_embeddings, self.embedding_dim)}

    def convert(self, weight, bias):
        weight = weight.detach()
        location = file_location(weight) if weight.dtype == torch.float32 and weight.is_contiguous() else None
        self.close()
        if location is not None and sys.byteorder == "little":
            try:
                self._fd = os.open(location[0], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:  # e.g. the file was removed while loading
                self._fd = None
        if self._fd is None:
            self.table = weight.float().contiguous().clone()
            return
        self._path, self._offset = location
        self._identity = self._stat()

    def _stat(self):
        st = os.fstat(self._fd)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def forward(self, ids: Tensor) -> Tensor:
        if self._fd is None:
            if self.table is None:
                raise RuntimeError("FileEmbedding has no weights yet: load a state dict into it first")
            return F.embedding(ids, self.table)
        if self._stat() != self._identity:
            raise RuntimeError(f"{self._path} changed on disk after it was loaded (overwritten in place?): restart "
                               "the service to load the new model")
        width = self.embedding_dim * 4
        flat = ids.reshape(-1).tolist()
        if any(i < 0 or i >= self.num_embeddings for i in flat):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        rows = {}
        for i in set(flat):
            data = os.pread(self._fd, width, self._offset + i * width)
            if len(data) != width:
                raise RuntimeError(f"{self._path} is shorter than when it was loaded: restart the service")
            rows[i] = torch.frombuffer(bytearray(data), dtype=torch.float32)
        out = torch.stack([rows[i] for i in flat]) if flat else torch.empty(0, self.embedding_dim)
        return out.reshape(*ids.shape, self.embedding_dim)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def extra_repr(self) -> str:
        where = "read from the checkpoint file" if self._fd is not None else "in memory"
        return f"{self.num_embeddings}, {self.embedding_dim}, {where}"


class ExpMish(nn.Module):
    """Mish, x * tanh(softplus(x)), computed as x * n / (n + 2) with n = e^x (e^x + 2): the same function with one
    exp instead of exp, log1p and tanh, cheaper than torch's kernel (the results differ by rounding only).
    Above x = 20 the factor n / (n + 2) is 1 in float32, so x is clamped there before the exp (no overflow)."""

    def forward(self, x: Tensor) -> Tensor:
        e = torch.exp(x.clamp(max=20.0))
        n = e.add(2.0).mul_(e)
        return n.div_(n + 2.0).mul_(x)


def checkpoint_form(module: nn.Module) -> Dict[str, Tuple[Tuple[int, ...], Optional[torch.dtype]]]:
    """Key -> (shape, dtype) of the float32 checkpoint ``module`` loads strictly: its state dict for nn layers, the
    float32 layer a converted layer stands for (dtype None: it converts what it is given)."""
    form = {}
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(sub, Float32Checkpoint):
            form.update({prefix + k: (shape, None) for k, shape in sub.checkpoint_shapes().items()})
            continue
        own = [*sub._parameters.items(),
               *((k, b) for k, b in sub._buffers.items() if k not in sub._non_persistent_buffers_set)]
        form.update({prefix + k: (tuple(t.shape), t.dtype) for k, t in own if t is not None})
    return form
