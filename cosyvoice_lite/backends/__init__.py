"""Execution runtime of the heavy stages and the precision each stage runs at on this CPU.

``plan(mode, cpu, backend)`` decides, per stage, which runtime and precision a speed mode gets here:

- ``exact``: float32 PyTorch everywhere (the parity reference).
- ``default``: the flow estimator and HiFT's convolutional body in OpenVINO bf16 where the CPU multiplies bf16
  natively (avx512_bf16 or amx_bf16; Arm bf16), the estimator's matmuls in int8 there; else in PyTorch (float16
  weights, float32 arithmetic; HiFT float32 time-major; ``backend="openvino"`` asks for the OpenVINO float32
  estimator there). The LLM in int8 (PyTorch/fbgemm).
- ``fast``: as ``default`` with the mode's fewer Euler steps and its int8 PyTorch layers where they remain.

``accelerate(model, ...)`` applies the plan to a loaded model: converted models and compiled blobs come from the
disk cache (``ov_runtime``), and any failure leaves that stage on PyTorch, logged. ``BACKEND=torch`` disables it.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cpu import CpuInfo, cpu_info

log = logging.getLogger("cosyvoice_lite.backends")

BACKENDS = ("auto", "openvino", "torch")
# the stages an execution backend may take over; the others always run in PyTorch
OFFLOADED = ("flow_estimator", "hift")


@dataclass(frozen=True)
class Stage:
    runtime: str    # "torch" or "openvino"
    precision: str  # "fp32", "bf16", "fp16", "int8" (the weights' form; activations are float32 unless bf16)
    matmuls: str = ""  # OpenVINO: "int8" when its matmuls multiply in int8 (weights and activations)

    def __str__(self) -> str:
        return f"{self.runtime} {self.precision}" + (f", {self.matmuls} matmuls" if self.matmuls else "")


def torch_plan(mode) -> dict[str, Stage]:
    """What the PyTorch path of a mode runs (speed.ModeSettings)."""
    return {"llm": Stage("torch", mode.llm), "flow_encoder": Stage("torch", mode.flow),
            "flow_estimator": Stage("torch", mode.flow), "hift": Stage("torch", mode.hift.split("-")[0])}


def plan(mode, cpu: CpuInfo, backend: str = "auto", openvino: bool = True) -> dict[str, Stage]:
    """Runtime and precision per stage for a speed mode on this CPU; ``openvino``: the runtime can be imported."""
    if backend not in BACKENDS:
        raise ValueError(f"BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    stages = torch_plan(mode)
    if backend == "torch" or not openvino or mode.name == "exact":
        return stages
    if cpu.native_bf16:
        # the estimator's matmuls in int8: half its resident weights and faster calls, for a larger mel error
        # (docs/performance.md, "Errors per mode and backend")
        stages["flow_estimator"] = Stage("openvino", "bf16", matmuls="int8")
        stages["hift"] = Stage("openvino", "bf16")
    elif backend == "openvino":
        # without native bf16 OpenVINO float32 beats only PyTorch float32: it ties with the default mode's
        # float16-weight estimator, loses to fast's int8 one and keeps float32 weights per kernel layout, so
        # ``auto`` stays in PyTorch there; HiFT's body does not gain from it either
        stages["flow_estimator"] = Stage("openvino", "fp32")
    return stages


OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
BODY_PARTS = ("conv_pre", "ups", "source_downs", "source_resblocks", "resblocks", "conv_post")  # HiFT.body's layers
ESTIMATOR_BODY = ("down_blocks", "mid_blocks", "up_blocks", "final_block", "final_proj")  # not its time embedding
# module paths of what a stage run by OpenVINO replaces (built float32 and left unread: model.precision.external)
EXTERNAL = {"flow_estimator": tuple(f"flow.decoder.estimator.{part}" for part in ESTIMATOR_BODY),
            "hift": tuple(f"hift.{part}" for part in BODY_PARTS)}


def runtime_plan(mode, backend: str = "auto", cpu: CpuInfo | None = None) -> dict[str, Stage]:
    """``plan`` for this CPU (or ``cpu``) and the installed runtime; says so when OpenVINO cannot be imported."""
    from .ov_runtime import available

    openvino = available() is not None
    cpu = cpu or cpu_info()
    if backend in ("auto", "openvino") and not openvino:
        log.warning("openvino cannot be imported: every stage runs in PyTorch")
    elif backend == "auto" and not cpu.native_bf16 and mode.name != "exact":
        log.info("no native bf16 on this CPU: the flow and HiFT run in PyTorch (BACKEND=openvino runs the flow "
                 "estimator in OpenVINO float32)")
    return plan(mode, cpu, backend, openvino=openvino)


def external_paths(stages: dict[str, Stage]) -> tuple:
    """The module paths the model need not build in its PyTorch precision: the stages OpenVINO will run."""
    return tuple(path for name in OFFLOADED if stages[name].runtime == "openvino" for path in EXTERNAL[name])


def accelerate(model, mode, model_dir, backend: str = "auto", cache_root: str | Path | None = None,
               threads: int = 1, cpu: CpuInfo | None = None, stages: dict[str, Stage] | None = None) -> dict:
    """Run the stages the plan gives to OpenVINO there (in place on ``model``); returns what runs where (for the
    start log and /ready). Without ``cache_root`` converted models live in a temporary directory (not kept).
    ``cpu``: plan for another CPU's features than this one's (the kernels still run on this one). ``stages``: the
    plan the model was built for (``runtime_plan``; made here when not given)."""
    from .ov_runtime import available

    cpu = cpu or cpu_info()
    version = available()
    stages = dict(stages) if stages is not None else runtime_plan(mode, backend, cpu)
    wanted = [name for name in OFFLOADED if stages[name].runtime == "openvino"]
    root = None
    if wanted:
        root = Path(cache_root) if cache_root else Path(tempfile.mkdtemp(prefix="cosyvoice-lite-ov-"))
    try:
        _offload(model, mode, model_dir, stages, wanted, root, threads)
        if stages["hift"].runtime == "torch" and getattr(model.hift, "body_window", None):
            model.hift.body_runner = TrimmedBody(model.hift.body)
    finally:
        if wanted and not cache_root:  # the compiled models are in memory: the converted files are not needed
            shutil.rmtree(root, ignore_errors=True)
    info = describe(stages, cpu, version)
    log.info("runtime (%s mode): %s; cpu %s [%s]%s", mode.name,
             ", ".join(f"{name} {stage}" for name, stage in stages.items()), cpu.model, " ".join(cpu.features),
             f" (kernels capped at {cpu.isa_limit})" if cpu.isa_limit else "")
    return info


class TrimmedBody:
    """HiFT's PyTorch body, the heap trimmed after each call (each window of a long chunk).

    Why: its activations are blocks of a few MB, below the size glibc maps on their own (memory.map_large_blocks),
    so a window's freed blocks stay resident in the heap, and the next window, fragmenting them, adds its own
    (docs/performance.md, Memory). The compiled body trims after each call for the same reason
    (ov_runtime.HiftBodyRunner)."""

    def __init__(self, body):
        self.body = body

    def __call__(self, mel, s_stft):
        from ..memory import release_free_memory

        out = self.body(mel, s_stft)
        release_free_memory()
        return out


def describe(stages: dict[str, Stage], cpu: CpuInfo | None = None, version: str | None = None) -> dict:
    """What runs where, as the start log and /ready show it."""
    cpu = cpu or cpu_info()
    return {"backend": "openvino" if any(s.runtime == "openvino" for s in stages.values()) else "torch",
            "openvino": version, "stages": {name: str(stage) for name, stage in stages.items()},
            "cpu": cpu.model, "cpu_features": list(cpu.features), "cpu_isa_limit": cpu.isa_limit}


def _offload(model, mode, model_dir, stages: dict, wanted: list, root: Path, threads: int) -> None:
    from ..memory import release_free_memory
    from ..model.fingerprint import model_fingerprint
    from .ov_runtime import STAGE_FILES, TimeEmbedding, compile_stage, ensure_converted, example_inputs, stage_dir

    for name in wanted:
        stage = "estimator" if name == "flow_estimator" else "hift"
        try:
            weights = ("f32" if mode.name == "exact"  # exact keeps float32 weights
                       else "i8" if stages[name].matmuls == "int8" else "f16")
            directory = stage_dir(root, stage, model_fingerprint(model_dir, files=STAGE_FILES[stage]), weights)
            ensure_converted(stage, directory, model_dir, weights, threads)
            module = model.flow.decoder.estimator if stage == "estimator" else model.hift
            embed_time = TimeEmbedding(module) if stage == "estimator" else None
            example = example_inputs(stage, module)[0]
            del module  # the PyTorch estimator must be freed once it is replaced
            runner = compile_stage(stage, directory, OV_PRECISION[stages[name].precision], threads, embed_time,
                                   example=example)
        except Exception as error:  # a graph the converter cannot take, a broken install, a full disk, ...
            log.warning("openvino: %s stays in PyTorch (%s: %s)", name, type(error).__name__, error)
            built_for_openvino = set(EXTERNAL[name]) <= set(getattr(model, "external", ()))
            stages[name] = Stage("torch", "fp32") if built_for_openvino else torch_plan(mode)[name]
            continue
        if stage == "estimator":
            model.flow.decoder.estimator = runner  # the PyTorch estimator's weights are released
        else:
            model.hift.body_runner = runner
            for part in BODY_PARTS:  # the PyTorch body's weights are not used any more
                getattr(model.hift, part).to("meta")
        release_free_memory()  # the replaced weights' pages go back before the next stage's first run
