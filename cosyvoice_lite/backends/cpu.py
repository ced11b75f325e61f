"""What the CPU this process runs on can do: its model name and the instruction-set features that decide which
precisions are native here (read from /proc/cpuinfo on Linux; other systems report what Python can see), less
those above ``ONEDNN_MAX_CPU_ISA`` or ``OV_CPU_MAX_ISA`` when set: oneDNN (in PyTorch and in OpenVINO) and
OpenVINO's own kernels then do not use them, so a plan that counted on them would pick emulated kernels."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache

# x86 flags that matter for inference kernels (Linux /proc/cpuinfo names)
X86_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
                "amx_tile", "avx512_fp16")
# aarch64 'Features' names: bf16 matrix multiply (bf16), int8 dot products (asimddp, i8mm), fp16 arithmetic
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "fphp", "asimdhp", "sve", "sve2")
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "OV_CPU_MAX_ISA")  # the caps oneDNN and OpenVINO's CPU plugin read (same values)
# the X86_FEATURES the kernels may use under each cap (oneDNN's ISA levels; VNNI on AVX2 is a branch)
_AVX2 = ("avx2", "fma")
_AVX512 = _AVX2 + ("avx512f", "avx512_vnni", "avx512_bf16")
ISA_FEATURES = {"SSE41": (), "AVX": (), "AVX2": _AVX2, "AVX2_VNNI": _AVX2 + ("avx_vnni",),
                "AVX2_VNNI_2": _AVX2 + ("avx_vnni",), "AVX512_CORE": _AVX512[:3], "AVX512_CORE_VNNI": _AVX512[:4],
                "AVX512_CORE_BF16": _AVX512, "AVX512_CORE_FP16": _AVX512 + ("avx512_fp16",),
                "AVX10_1_512": _AVX512 + ("avx512_fp16",),
                "AVX512_CORE_AMX": _AVX512 + ("avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"),
                "AVX10_1_512_AMX": _AVX512 + ("avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    cores: int
    features: tuple = field(default=())
    isa_limit: str | None = None  # the ISA cap (ONEDNN_MAX_CPU_ISA / OV_CPU_MAX_ISA) when it took features away

    def has(self, *names: str) -> bool:
        return any(name in self.features for name in names)

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix products in hardware (not emulated through float32 conversions)."""
        return self.has("avx512_bf16", "amx_bf16") if self.arch in ("x86_64", "AMD64") else self.has("bf16")

    @property
    def fast_int8(self) -> bool:
        """int8 dot-product instructions (VNNI / AMX on x86, dot product on Arm)."""
        return self.has("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")

    def as_dict(self) -> dict:
        return {"model": self.model, "arch": self.arch, "cores": self.cores, "features": list(self.features),
                "native_bf16": self.native_bf16, "fast_int8": self.fast_int8, "isa_limit": self.isa_limit}


def parse_cpuinfo(text: str, arch: str) -> tuple[str, tuple]:
    """(model name, relevant features present) from the text of /proc/cpuinfo (first processor block)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    known = ARM_FEATURES if arch in ("aarch64", "arm64") else X86_FEATURES
    return model, tuple(name for name in known if name in flags)


def limited(features: tuple, arch: str, limit: str | None) -> tuple[tuple, str | None]:
    """(features, the limit if it removed any) under an ``ONEDNN_MAX_CPU_ISA`` / ``OV_CPU_MAX_ISA`` value (x86
    only)."""
    # ALL, DEFAULT, the levels above AMX or a name oneDNN does not know either: no limit
    allowed = ISA_FEATURES.get(limit.strip().upper()) if limit and arch in ("x86_64", "AMD64") else None
    if allowed is None:
        return features, None
    kept = tuple(name for name in features if name in allowed)
    return kept, (limit.strip().upper() if kept != features else None)


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    arch = platform.machine() or "unknown"
    model, features = "", ()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model, features = parse_cpuinfo(f.read(), arch)
    except OSError:  # not Linux: no feature list; only the float32 paths are chosen
        pass
    isa_limit = None
    for name in ISA_ENV:  # the lower cap wins
        features, limit = limited(features, arch, os.environ.get(name))
        isa_limit = limit or isa_limit
    return CpuInfo(model=model or platform.processor() or arch, arch=arch, cores=os.cpu_count() or 1,
                   features=features, isa_limit=isa_limit)
