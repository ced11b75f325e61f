"""Speed modes: the same networks, traded between exactness and speed on a CPU.

- ``exact``: float32 everywhere, the official operation order (what the parity tests run).
- ``default``: the LLM's linear layers (text encoder, LM) in int8 with per-output-channel weight scales (fbgemm
  dynamic quantization: activations are quantized per call), its input layers, speech-token head and text
  embedding table in float16; q/k/v fused into one matmul; the flow's linear layers with float16 weights (float32
  arithmetic), the official 10 Euler steps, the estimator's Mish as ExpMish; HiFT in float32. The convolutions of
  the estimator and HiFT run on time-major (channels-last) memory, where oneDNN's kernels are faster. The LLM
  reads a quarter of the weight bytes per token, which is what a decode step costs on a CPU; the flow's float16
  weights halve its memory. Concurrent requests are batched (LM steps, equal-size flow chunks). Speed and memory
  per mode: ``scripts/bench.py`` and the README's performance section.
- ``fast``: ``default`` with the flow's linear layers in int8, 5 Euler steps instead of 10, HiFT's residual
  blocks (most of its work) as int8 convolutions (fbgemm dynamic quantization), and a shorter first streaming
  join (10 tokens and 10 HiFT frames instead of the official 20 and 20), so the first chunk needs fewer tokens and
  the first audio comes sooner, at the cost of a rougher cross-fade at that one join.

These are the PyTorch forms of the modes. bfloat16 depends on the CPU (emulated, and slow, without avx512_bf16 /
amx_bf16), so it is chosen by the execution backend (``cosyvoice_lite/backends``), which looks at the running CPU
and may run the flow estimator and HiFT's body in OpenVINO instead. torch.compile is not used: its warm-up costs
minutes per input length.

``apply_mode(model, mode)`` converts a loaded float32 ``CosyVoiceSFT`` in place; ``load_model(dir, mode=...)`` does it
while loading, one layer at a time, so that the float32 weights never all sit in memory at once.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mapping import release_pages

MODES = ("exact", "default", "fast")
MODE_ENV = "COSYVOICE_MODE"  # environment variable the engine reads when no mode is passed


@dataclass(frozen=True)
class ModeSettings:
    name: str
    llm: str                # LLM linears: "fp32" or "int8" (input layers and head in fp16, see LLM_FP16)
    flow: str               # flow encoder + estimator linears: "fp32", "fp16" or "int8"
    hift: str               # HiFT: "fp32" (official layout), "fp32-tm" (time-major convolutions, TimeMajorConv1d)
                            # or "int8-tm" (int8 residual blocks, the other convolutions time-major)
    n_timesteps: int        # Euler steps of the flow
    batched: bool           # concurrent requests share LM steps and flow passes (batch rounding differs slightly)
    first_overlap: int = 20  # streaming: tokens shared by a request's first and second chunk (official: 20)
    first_cache: int = 20    # streaming: mel frames HiFT sees twice at that join (official: 20)


SETTINGS = {
    "exact": ModeSettings("exact", llm="fp32", flow="fp32", hift="fp32", n_timesteps=10, batched=False),
    "default": ModeSettings("default", llm="int8", flow="fp16", hift="fp32-tm", n_timesteps=10, batched=True),
    "fast": ModeSettings("fast", llm="int8", flow="int8", hift="int8-tm", n_timesteps=5, batched=True,
                         first_overlap=10, first_cache=10),
}


def settings(mode: Optional[str]) -> ModeSettings:
    """Settings of a mode name (None -> $COSYVOICE_MODE or 'default')."""
    name = (mode or os.environ.get(MODE_ENV) or "default").strip().lower()
    if name not in SETTINGS:
        raise ValueError(f"unknown speed mode {name!r}; choose one of {', '.join(MODES)}")
    return SETTINGS[name]


def own_bias(bias: Optional[Tensor]) -> Optional[Tensor]:
    """A float32 copy of a bias for fbgemm's packed layers: they keep the tensor they are given, and one that lives
    in a memory-mapped checkpoint would keep the mapping in use (see mapping.copy_out_of_mappings)."""
    return None if bias is None else bias.detach().float().clone()


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (symmetric, one scale per output row) in fbgemm's packed layout.

    Activations are quantized per call to 7-bit unsigned (fbgemm's AVX2 kernels need the reduced range to avoid
    16-bit saturation); accumulation is int32 and the result float32.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        super().__init__()
        weight = weight.detach().float()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; the fbgemm kernels are current
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.int64), 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(q, own_bias(bias))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Fp16Linear(nn.Module):
    """y = x W^T + b with W stored as float16 (fbgemm packed); activations and accumulation stay float32.

    Half the bytes of float32 and ~1e-4 relative error per layer (the rounding of the weights only).
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), own_bias(bias))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp16Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self._packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16"


KINDS = {"int8": Int8Linear, "fp16": Fp16Linear}


class Int8Conv1d(nn.Module):
    """Conv1d with int8 weights (one scale per output channel) run by fbgemm's dynamic quantized convolution:
    the input is quantized per call (7-bit, per tensor)."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        weight = conv.weight.detach().float()
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        scale = (weight.abs().flatten(1).amax(dim=1) / 127).clamp(min=1e-12).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.int64), 0, torch.qint8)
            bias = own_bias(conv.bias)
            self._packed = torch.ops.quantized.conv1d_prepack(q, bias, list(conv.stride), list(conv.padding),
                                                              list(conv.dilation), conv.groups)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.conv1d_dynamic(x, self._packed, True)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, int8"


class TimeMajorConv1d(nn.Module):
    """Conv1d / ConvTranspose1d run as a 2-D convolution on channels-last (time-major) tensors.

    A (B, C, T) tensor whose memory is laid out (B, T, C) is, seen as (B, C, 1, T), channels-last: oneDNN's direct
    kernels are faster in that layout than on (B, C, T) memory for HiFT's long 128/256-channel sequences. The
    output keeps the time-major layout, and elementwise operations keep the layout of their input, so a stack of
    these converts the input once. Same arithmetic up to float rounding
    (~1e-6 relative). Any input layout is accepted.
    """

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.transposed = isinstance(conv, nn.ConvTranspose1d)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.weight = nn.Parameter(conv.weight.detach().unsqueeze(2).clone(memory_format=torch.channels_last),
                                   requires_grad=False)  # (C_out, C_in/g, 1, k); transposed: (C_in, C_out/g, 1, k)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation = (1, conv.stride[0]), (0, conv.padding[0]), (1, conv.dilation[0])
        self.groups = conv.groups
        self.output_padding = (0, conv.output_padding[0]) if self.transposed else None

    def forward(self, x: Tensor) -> Tensor:
        x = x.unsqueeze(2)  # (B, C, 1, T)
        if self.transposed:
            y = F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                   self.groups, self.dilation)
        else:
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y.squeeze(2)  # (B, C_out, T'), memory (B, T', C_out)

    def extra_repr(self) -> str:
        kind = "transposed, " if self.transposed else ""
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, {kind}time-major"


def replace_modules(module: nn.Module, kinds: tuple, make) -> int:
    """Replace every module below `module` whose exact type is in `kinds` by make(old); returns how many.
    The old module's weight and bias pages are released (they may be memory-mapped checkpoint tensors)."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) in kinds:
            setattr(module, name, make(child))
            release(*(t for t in (getattr(child, "weight", None), getattr(child, "bias", None)) if t is not None))
            count += 1
        else:
            count += replace_modules(child, kinds, make)
    return count


def time_major_convs(module: nn.Module) -> int:
    """Replace every nn.Conv1d / nn.ConvTranspose1d below `module` by a TimeMajorConv1d; returns how many."""
    return replace_modules(module, (nn.Conv1d, nn.ConvTranspose1d), TimeMajorConv1d)


class ExpMish(nn.Module):
    """Mish, x * tanh(softplus(x)), computed as x * n / (n + 2) with n = e^x (e^x + 2): the same function with one
    exp instead of exp, log1p and tanh, cheaper than torch's kernel (the results differ by rounding only).
    Above x = 20 the factor n / (n + 2) is 1 in float32, so x is clamped there before the exp (no overflow)."""

    def forward(self, x: Tensor) -> Tensor:
        e = torch.exp(x.clamp(max=20.0))
        n = e.add(2.0).mul_(e)
        return n.div_(n + 2.0).mul_(x)


def replace_mish(module: nn.Module) -> int:
    """Replace every nn.Mish below `module` by an ExpMish; returns how many."""
    return replace_modules(module, (nn.Mish,), lambda _: ExpMish())


def quantize_convs(module: nn.Module) -> int:
    """Replace every nn.Conv1d below `module` by an Int8Conv1d; returns how many."""
    return replace_modules(module, (nn.Conv1d,), Int8Conv1d)


def release(*tensors: Tensor) -> None:
    """Give the pages of memory-mapped checkpoint tensors back to the OS (they are not needed any more)."""
    for tensor in tensors:
        release_pages(tensor)


# LLM linears kept at 16 bits in the int8 modes: the input layers see rows of very different scales at once (the
# prefix: sos, speaker, text, task id), which per-call 8-bit activation scales crush, and the speech-token head
# decides the sampled token directly. Together they are 2% of the LLM's weights.
LLM_FP16 = ("embed.out.0", "llm_decoder")
LLM_SKIP = ("spk_embed_affine_layer",)  # tiny, run once per segment: float32


def quantize_linears(module: nn.Module, kind: str = "int8", fp16: Iterable[str] = (), skip: Iterable[str] = (),
                     _path: str = "") -> int:
    """Replace every nn.Linear below `module` by a KINDS[kind] layer; returns how many were replaced.

    Linears whose dotted path ends with a name in `fp16` become Fp16Linear, those ending with a name in `skip`
    stay float32. The float32 weights are dropped (and their pages released if they were memory-mapped) one layer at a time.
    """
    def choice(path):
        if any(path == n or path.endswith("." + n) for n in skip):
            return None
        return "fp16" if any(path == n or path.endswith("." + n) for n in fp16) else kind

    count = 0
    for name, child in list(module.named_children()):
        path = f"{_path}.{name}" if _path else name
        if isinstance(child, nn.Linear):
            if choice(path):
                setattr(module, name, KINDS[choice(path)].from_linear(child))
                release(child.weight, *([child.bias] if child.bias is not None else []))
                count += 1
        else:
            count += quantize_linears(child, kind, fp16, skip, path)
    return count


class Fp16Embedding(nn.Module):
    """An embedding table stored as float16, looked up rows returned as float32: half the memory of the LLM's
    text table (51866 x 512, 106 MB in float32), whose rows then go through 16-bit weights anyway."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.register_buffer("weight", embedding.weight.detach().half())

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight).float()


def quantize_llm(llm: nn.Module) -> int:
    """LLM linears in int8 (a few in float16, see LLM_FP16), the text embedding table in float16."""
    if isinstance(llm.text_embedding, nn.Embedding):
        old = llm.text_embedding
        llm.text_embedding = Fp16Embedding(old)
        release(old.weight)
    return quantize_linears(llm, "int8", fp16=LLM_FP16, skip=LLM_SKIP)


def quantize_flow(flow: nn.Module, kind: str) -> int:
    """Flow encoder and estimator linears in `kind` (the length regulator and small projections stay float32)."""
    return quantize_linears(flow.encoder, kind) + quantize_linears(flow.decoder.estimator, kind)


def apply_mode(model, mode: Optional[str] = None):
    """Convert a float32 CosyVoiceSFT in place to `mode` (see module docstring); returns the model.

    Conversions are one-way: a converted model cannot go back to a more exact mode (load it again for that).
    Parts that are already converted are left as they are.
    """
    target = settings(mode)
    current = getattr(model, "mode", SETTINGS["exact"])
    if any(getattr(current, part) not in ("fp32", getattr(target, part)) for part in ("llm", "flow", "hift")):
        raise ValueError(f"model is already in {current.name!r} mode; load it again to use {target.name!r}")
    with torch.inference_mode(False), torch.no_grad():
        if target.llm != "fp32":
            quantize_llm(model.llm)
        if target.flow != "fp32":
            quantize_flow(model.flow, target.flow)
            time_major_convs(model.flow.decoder.estimator)
            replace_mish(model.flow)
        if target.hift == "int8-tm":  # the F0 predictor and the convolutions around the iSTFT stay float32
            quantize_convs(model.hift.resblocks)
            quantize_convs(model.hift.source_resblocks)
        if target.hift != "fp32":
            time_major_convs(model.hift)
    model.mode = target
    return model
