"""Precision policy: which layers of the three networks are float32, float16, int8 or time-major.

The network builders ask a ``Precision`` for their layers (``linear``, ``conv1d``, ``conv_transpose1d``, ``mish``,
``embedding``) instead of creating nn layers, so a model is built in its speed mode's form from the start. A policy
carries the dotted path of the module being built (``at(name)`` goes one level down); the rules read it, e.g.
``llm.llm.encoders.0.feed_forward.w_1`` or ``hift.resblocks.3.convs1.0``. ``EXACT`` (the builders' default) gives
the plain nn layers of the official model.

bfloat16 is not a PyTorch-mode choice here: it depends on the CPU and is chosen by the execution backend
(``cosyvoice_lite/backends``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from .layers import ExpMish, FileEmbedding, Fp16Linear, Int8Conv1d, Int8Linear, TimeMajorConv1d
from .modes import ModeSettings

# LLM linears kept at 16 bits in the int8 modes: the input layers see rows of very different scales at once (the
# prefix: sos, speaker, text, task id), which per-call 8-bit activation scales crush, and the speech-token head
# decides the sampled token directly. Together they are 2% of the LLM's weights.
LLM_FP16 = ("embed.out.0", "llm_decoder")
LLM_SKIP = ("spk_embed_affine_layer",)  # tiny, run once per segment: float32
# embedding tables read from the checkpoint file at each lookup in the lean modes (layers.FileEmbedding): a lookup
# reads a few rows (per text, per token step, per flow chunk), too few to pay for holding the tables in memory
FILE_TABLES = ("llm.text_embedding", "llm.speech_embedding", "flow.input_embedding")
# The parts of the flow whose linears follow the mode (the length regulator and small projections stay float32).
FLOW_LINEARS = ("flow.encoder", "flow.decoder.estimator")
FLOW_TIME_MAJOR = ("flow.decoder.estimator",)
# HiFT's residual blocks (most of its work) are int8 in 'int8-tm'; the F0 predictor and the convolutions around
# the iSTFT stay float32.
HIFT_INT8 = ("hift.resblocks", "hift.source_resblocks")

LINEARS = {"int8": Int8Linear, "fp16": Fp16Linear}


def _ends_with(path: str, names) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def _under(path: str, parts) -> bool:
    return any(path == p or path.startswith(p + ".") for p in parts)


@dataclass(frozen=True)
class Precision:
    """The layer forms of one speed mode (fields as in speed.ModeSettings) at module path ``path``."""

    llm: str = "fp32"   # LLM linears: "fp32" or "int8" (LLM_FP16 in float16, LLM_SKIP in float32)
    flow: str = "fp32"  # flow encoder + estimator linears: "fp32", "fp16" or "int8"
    hift: str = "fp32"  # "fp32" (official layout), "fp32-tm" (time-major convolutions) or "int8-tm"
    # module paths an execution backend runs (backends.external_paths): their layers stay the checkpoint's float32
    # ones, which the lean load leaves in the file mapping, untouched, until the backend's copy replaces them
    external: tuple = ()
    path: str = ""

    @classmethod
    def of(cls, mode: ModeSettings, external=()) -> "Precision":
        return cls(llm=mode.llm, flow=mode.flow, hift=mode.hift, external=tuple(external))

    def at(self, name) -> "Precision":
        """The policy one module further down, at ``<path>.<name>``."""
        return replace(self, path=self._join(name))

    def _join(self, name) -> str:
        name = str(name)
        return f"{self.path}.{name}" if self.path and name else self.path or name

    # --- the rules ---

    def linear_kind(self, path: str) -> str:
        if _under(path, self.external):
            return "fp32"
        if _under(path, ("llm",)) and self.llm != "fp32":
            if _ends_with(path, LLM_SKIP):
                return "fp32"
            return "fp16" if _ends_with(path, LLM_FP16) else self.llm
        return self.flow if _under(path, FLOW_LINEARS) else "fp32"

    def conv_kind(self, path: str, transposed: bool = False) -> str:
        """"fp32" (nn layer), "tm" (TimeMajorConv1d) or "int8" (Int8Conv1d)."""
        if _under(path, self.external):
            return "fp32"
        if _under(path, ("hift",)) and self.hift != "fp32":
            return "int8" if self.hift == "int8-tm" and not transposed and _under(path, HIFT_INT8) else "tm"
        return "tm" if self.flow != "fp32" and _under(path, FLOW_TIME_MAJOR) else "fp32"

    # --- the layers ---

    def linear(self, in_features: int, out_features: int, bias: bool = True, name: str = "") -> nn.Module:
        kind = self.linear_kind(self._join(name))
        layer = nn.Linear if kind == "fp32" else LINEARS[kind]
        return layer(in_features, out_features, bias=bias)

    def conv1d(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
               dilation: int = 1, groups: int = 1, bias: bool = True, name: str = "") -> nn.Module:
        kind = self.conv_kind(self._join(name))
        layer = {"fp32": nn.Conv1d, "tm": TimeMajorConv1d, "int8": Int8Conv1d}[kind]
        return layer(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias)

    def conv_transpose1d(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                         padding: int = 0, output_padding: int = 0, groups: int = 1, bias: bool = True,
                         dilation: int = 1, name: str = "") -> nn.Module:
        if self.conv_kind(self._join(name), transposed=True) == "fp32":
            return nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                      output_padding=output_padding, groups=groups, bias=bias, dilation=dilation)
        return TimeMajorConv1d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                               dilation=dilation, groups=groups, bias=bias, transposed=True,
                               output_padding=output_padding)

    def mish(self, name: str = "") -> nn.Module:
        # the flow's Mish (length regulator and estimator) follows its linears
        path = self._join(name)
        return ExpMish() if self.flow != "fp32" and _under(path, ("flow",)) and not _under(path, self.external) \
            else nn.Mish()

    def embedding(self, num_embeddings: int, embedding_dim: int, name: str = "") -> nn.Module:
        path = self._join(name)
        lean = self.llm != "fp32" if _under(path, ("llm",)) else self.flow != "fp32"
        if lean and path in FILE_TABLES:
            return FileEmbedding(num_embeddings, embedding_dim)
        return nn.Embedding(num_embeddings, embedding_dim)


EXACT = Precision()  # float32, the official layers
