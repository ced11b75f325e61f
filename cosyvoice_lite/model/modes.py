"""The modes: the same networks, traded between exactness and speed on a CPU.

- ``exact``: float32 everywhere, the official operation order (what the parity tests run).
- ``default``: the LLM's linear layers (text encoder, LM) in int8 with per-output-channel weight scales (fbgemm
  dynamic quantization: activations are quantized per call), its input layers and speech-token head in float16,
  its embedding tables read from the checkpoint file at each lookup; q/k/v fused into one matmul; the LM's keys
  and values kept in float16 (half the memory of a long sequence; attention in float32, greedy tokens unchanged);
  the flow's linear layers with float16 weights (float32
  arithmetic), the official 10 Euler steps, the estimator's Mish as ExpMish; HiFT in float32. The convolutions of
  the estimator and HiFT run on time-major (channels-last) memory, where oneDNN's kernels are faster. The LLM
  reads a quarter of the weight bytes per token, which is what a decode step costs on a CPU; the flow's float16
  weights halve its memory. Concurrent requests are batched (LM steps, equal-size flow chunks). Speed and memory
  per mode: ``scripts/bench.py`` and the README's performance section.
- ``fast``: ``default`` with the flow's linear layers in int8, 5 Euler steps instead of 10, HiFT's residual
  blocks (most of its work) as int8 convolutions (fbgemm dynamic quantization), and a shorter first streaming
  join (10 tokens and 10 HiFT frames instead of the official 20 and 20), so the first chunk needs fewer tokens and
  the first audio comes sooner, at the cost of a rougher cross-fade at that one join.

Both lean modes run HiFT's body on chunks longer than ``HIFT_WINDOW`` frames in overlapping windows (the same
output up to float rounding), so that its memory does not grow with the chunk, and stream an unseeded request with
hops that grow by what the measured speed allows while the service keeps up with real time (``adaptive_hops``:
fewer gaps for its listener; exact mode and seeded requests keep the official hops).

These are the PyTorch forms of the modes. bfloat16 depends on the CPU (emulated, and slow, without avx512_bf16 /
amx_bf16), so it is chosen by the execution backend (``cosyvoice_lite/backends``), which looks at the running CPU
and may run the flow estimator and HiFT's body in OpenVINO instead. torch.compile is not used: its warm-up costs
minutes per input length.

A mode's layer forms are chosen when the networks are built: ``precision.Precision.of(settings)`` is the policy
the builders ask for their layers, and ``load_model(dir, mode=...)`` converts the float32 checkpoints while loading
them, one layer at a time, so that the float32 weights never all sit in memory at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MODES = ("exact", "default", "fast")


@dataclass(frozen=True)
class ModeSettings:
    name: str
    llm: str                # LLM linears: "fp32" or "int8" (input layers and head in fp16: precision.LLM_FP16)
    flow: str               # flow encoder + estimator linears: "fp32", "fp16" or "int8"
    hift: str               # HiFT: "fp32" (official layout), "fp32-tm" (time-major convolutions, TimeMajorConv1d)
                            # or "int8-tm" (int8 residual blocks, the other convolutions time-major)
    n_timesteps: int        # Euler steps of the flow
    batched: bool           # concurrent requests share LM steps and flow passes (batch rounding differs slightly)
    first_overlap: int = 20  # streaming: tokens shared by a request's first and second chunk (official: 20)
    first_cache: int = 20    # streaming: mel frames HiFT sees twice at that join (official: 20)
    hift_window: int = 0     # mel frames per HiFT body call (0: a whole chunk; see HiFTGenerator.body_window)
    kv_cache: str = "fp32"   # the batched LM step's keys and values: "fp32" or "fp16" (attention in float32)
    adaptive_hops: bool = False  # streaming while the service keeps up with real time: hops that grow from the first
                                 # by what the measured speed allows (False: official; see decode/scheduler.py)


# The lean modes vocode chunks longer than this in windows (each with HiFT's receptive field, 14 frames for the
# official sizes, computed again on each side): the activations of one call stay those of ~2 s of audio instead of
# growing with the chunk, for ~10% more vocoder work on the chunks it splits.
HIFT_WINDOW = 160

SETTINGS = {
    "exact": ModeSettings("exact", llm="fp32", flow="fp32", hift="fp32", n_timesteps=10, batched=False),
    "default": ModeSettings("default", llm="int8", flow="fp16", hift="fp32-tm", n_timesteps=10, batched=True,
                            hift_window=HIFT_WINDOW, kv_cache="fp16", adaptive_hops=True),
    "fast": ModeSettings("fast", llm="int8", flow="int8", hift="int8-tm", n_timesteps=5, batched=True,
                         first_overlap=10, first_cache=10, hift_window=HIFT_WINDOW, kv_cache="fp16",
                         adaptive_hops=True),
}


def mode_settings(mode: Optional[str]) -> ModeSettings:
    """Settings of a mode name (None -> 'default'; the service reads COSYVOICE_MODE in settings.py)."""
    name = (mode or "default").strip().lower()
    if name not in SETTINGS:
        raise ValueError(f"unknown speed mode {name!r}; choose one of {', '.join(MODES)}")
    return SETTINGS[name]
