"""OpenVINO execution of the flow estimator and HiFT's convolutional body, converted from our PyTorch modules.

The PyTorch modules stay the definition: ``openvino.convert_model`` traces them (float32) into an OpenVINO model
with a dynamic batch and time axis, which the CPU plugin compiles at the precision asked for (``f32`` or
``bf16``). Both steps cost seconds, so their results are kept on disk:

    <cache_root>/compiled/openvino-<version>/<stage>-<checkpoint fingerprint>-<graph id>-<weights>/model.xml, model.bin
    .../blobs/   (OpenVINO's own CACHE_DIR: compiled blobs, keyed inside by the compile settings and precision)

The graph id hashes our module sources and ``GRAPH_VERSION``, so a code change converts again. Concurrent workers
convert one at a time (a lock file); the directory appears complete or not at all (written aside, renamed).
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..memory import release_free_memory

log = logging.getLogger("cosyvoice_lite.backends")

GRAPH_VERSION = 4  # bump when the saved graph changes in a way the source hash cannot see (e.g. trace inputs)
RUNTIME_CACHE_SHAPES = 16
ESTIMATOR_ROW_FRAMES = 1024  # see EstimatorRunner.row_frames
# inputs per group in which the CPU plugin quantizes the activations of a matmul with int8 weights: int8 weights
# with bf16 activations were slower than bf16 weights, and smaller groups were no faster but less exact
# (docs/performance.md, "Execution backends, measured")
INT8_GROUP = 128
PRIME_UNMAP_INTERVAL = 0.005  # s between drops of the model file's pages during the first run (see _Runner.prime)
STAGE_SOURCES = {"estimator": ("estimator.py",), "hift": ("hift.py",)}
STAGE_FILES = {"estimator": ("cosyvoice.yaml", "flow.pt"), "hift": ("cosyvoice.yaml", "hift.pt")}


def available() -> str | None:
    """The installed OpenVINO version, or None when it cannot be imported."""
    # OpenVINO's own kernels read their ISA cap once, when the library loads; capped at oneDNN's alone they
    # disagree with oneDNN's about the layout and read past buffers (a segfault)
    if os.environ.get("ONEDNN_MAX_CPU_ISA") and not os.environ.get("OV_CPU_MAX_ISA"):
        os.environ["OV_CPU_MAX_ISA"] = os.environ["ONEDNN_MAX_CPU_ISA"]
    try:
        import openvino
    except Exception:  # ImportError, or a broken native library
        return None
    return openvino.__version__.split("-")[0]


def graph_id(stage: str) -> str:
    model_dir = Path(__file__).resolve().parents[1] / "model"
    digest = hashlib.sha256(f"v{GRAPH_VERSION}".encode())
    for name in STAGE_SOURCES[stage]:
        digest.update((model_dir / name).read_bytes())
    for graph_pass in (*GRAPH_PASSES, int8_matmul_weights):  # what convert() does to the graph is part of it too
        digest.update(inspect.getsource(graph_pass).encode())
    return digest.hexdigest()[:12]


class _Runner(nn.Module):
    """A compiled OpenVINO model called like the module it replaces (torch tensors in and out). No parameters:
    the weights live in the compiled model."""

    release_after_call = False  # give the intermediate buffers back after each call (see HiftBodyRunner)

    def __init__(self, compiled, precision: str, description: str):
        super().__init__()
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request, reused: calls from several threads take turns
        self.precision = precision
        self.description = description
        self.files: Path | None = None  # the directory whose files the compiled model was read from

    def prime(self, *inputs: torch.Tensor) -> None:
        """Run once, then unmap the pages of the model file this process read the weights from.

        Why: the first inference repacks every weight into the kernels' layout (memory of the runtime's own); the
        file's float16 weights are then no longer read but stay resident, as much again as the repacked copy. The
        pages are only unmapped: a later read, if any, faults them in from the file. Done at start-up, so the
        first request neither pays for the repacking nor sees the memory peak of both copies.

        The pages are also dropped while that run reads them (every few milliseconds, from another thread): the
        weights are repacked one layer at a time, so the file's pages need never be resident all at once. A page
        dropped before its layer is repacked is read again from the page cache."""
        done = threading.Event()

        def drop_while_running():
            while not done.wait(PRIME_UNMAP_INTERVAL):
                unmap_file_pages(self.files)

        dropper = threading.Thread(target=drop_while_running, name="openvino-prime-unmap", daemon=True)
        dropper.start()
        try:
            self.run(*inputs)
        finally:
            done.set()
            dropper.join()
        unmap_file_pages(self.files)

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        arrays = [np.ascontiguousarray(x.detach().float().numpy()) for x in inputs]
        with self._lock:
            self._request.infer(arrays)
            out = self._request.get_output_tensor(0).data.copy()  # the request's buffer is reused by the next call
            if self.release_after_call:
                self._release()
        return torch.from_numpy(out)

    def release_buffers(self) -> None:
        """Give the intermediate buffers back (the next call allocates them again, for its own shapes), and the
        pages of the model's files that the calls read (weights the runtime uses in place, not repacked: the next
        call reads them again from the page cache)."""
        with self._lock:
            self._release()
            unmap_file_pages(self.files)

    def _release(self) -> None:
        self._compiled.release_memory()
        release_free_memory()  # the runtime frees them into the heap: hand the pages to the OS as well

    def extra_repr(self) -> str:
        return f"openvino {self.description}, {self.precision}"


class EstimatorRunner(_Runner):
    """ConditionalDecoder.forward(x, mask, mu, t, spks, cond) -> velocity (B, 80, T): the time embedding in
    PyTorch float32 (``embed_time``, small), the body compiled. The flow calls it with an all-ones mask (no
    padding), the only case the traced graph covers."""

    # rows x frames per compiled call: a batch beyond it runs in slices of rows, which costs nothing once a call
    # has a few hundred frames per row and bounds the activations the runtime holds for the call
    row_frames = ESTIMATOR_ROW_FRAMES

    def __init__(self, compiled, precision: str, description: str, embed_time: nn.Module):
        super().__init__(compiled, precision, description)
        self.embed_time = embed_time

    def forward(self, x, mask, mu, t, spks=None, cond=None):
        if spks is None or cond is None or not bool((mask == 1).all()):
            raise ValueError("the compiled estimator runs unpadded batches with speaker and cond inputs only")
        inputs = (x, mask, mu, self.embed_time(t), spks, cond)  # (B, ...) each
        rows = max(1, self.row_frames // x.shape[2])
        if x.shape[0] <= rows:
            return self.run(*inputs)
        return torch.cat([self.run(*(a[i:i + rows] for a in inputs)) for i in range(0, x.shape[0], rows)])


class TimeEmbedding(nn.Module):
    """The estimator's time embedding on its own (sinusoids + MLP), kept in PyTorch float32."""

    def __init__(self, estimator):
        super().__init__()
        self.time_embeddings, self.time_mlp = estimator.time_embeddings, estimator.time_mlp

    def forward(self, t):
        return self.time_mlp(self.time_embeddings(t).to(t.dtype))


class HiftBodyRunner(_Runner):
    """HiFTGenerator.body(mel, s_stft) -> (B, n_fft+2, S).

    Its intermediate buffers are released after every call: at the audio sample rate they are ~0.3 MB per mel
    frame, which the compiled model would otherwise keep for the longest chunk it has seen (hundreds of MB, for
    the worker's life). With dynamic shapes they are many blocks of a few MB, which the heap would keep resident
    until the next trim (~80 MB per long chunk, on top of the next chunk's), so the heap is trimmed as well. One
    call per chunk, so allocating them again costs little next to the call itself."""

    release_after_call = True

    def forward(self, mel, s_stft):
        return self.run(mel, s_stft)


def example_inputs(stage: str, module: nn.Module):
    """(inputs, dynamic shapes) of one call of a stage's traced body, sized by ``module``."""
    if stage == "estimator":  # CFG batch of 2, a few dozen frames (any batch and length work after conversion)
        B, T, C = 2, 64, module.out_channels
        spk = module.in_channels - 3 * C  # x, mu, cond are C channels each; the speaker vector fills the rest
        emb = module.time_mlp.linear_2.out_features
        inputs = (torch.randn(B, C, T), torch.ones(B, 1, T), torch.randn(B, C, T), torch.randn(B, emb),
                  torch.randn(B, spk), torch.zeros(B, C, T))
        shapes = [[-1, C, -1], [-1, 1, -1], [-1, C, -1], [-1, emb], [-1, spk], [-1, C, -1]]
    else:
        frames = 32
        mel = torch.randn(1, module.conv_pre.in_channels, frames)
        spec = module.n_fft + 2
        s_frames = frames * module.upsample_factor // module.hop_len + 1
        inputs = (mel, torch.randn(1, spec, s_frames))
        shapes = [[-1, module.conv_pre.in_channels, -1], [-1, spec, -1]]
    return inputs, shapes


class _Body(nn.Module):
    """A module's ``body`` method as a module of its own, for tracing."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *inputs):
        return self.module.body(*inputs)


def convert(stage: str, module: nn.Module, out_dir: Path, weights: str = "f16") -> None:
    """Trace a float32 module (the estimator, or a HiFTGenerator for its body) into out_dir/model.xml, its weights
    stored as ``weights``: 'f32', 'f16', or 'i8' (the matmuls' weights in int8, see int8_matmul_weights; the other
    weights in float16)."""
    import openvino as ov

    inputs, shapes = example_inputs(stage, module)
    target = _Body(module)
    with torch.no_grad(), warnings.catch_warnings():
        # the trace fixes the unpadded-mask branch; the runner accepts only that case
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = ov.convert_model(target, example_input=inputs,
                                 input=[(shape, ov.Type.f32) for shape in shapes])
    for graph_pass in GRAPH_PASSES:
        graph_pass(model)
    if weights == "i8":
        int8_matmul_weights(model)
    # float16 weights: half the memory of float32 next to the copy the CPU plugin repacks them into (the lossy
    # modes round the flow's weights at least that much anyway)
    ov.save_model(model, str(out_dir / "model.xml"), compress_to_fp16=weights != "f32")


SIN_DEGREE = 13  # odd Taylor polynomial on [-pi/2, pi/2]: the first term left out is below 1e-9
PI_HIGH = 3.140625  # pi in two parts (Cody-Waite): turns * PI_HIGH is exact in float32 (8 mantissa bits)
PI_LOW = math.pi - PI_HIGH


def polynomial_sin(model) -> int:
    """Replace every float32 Sin of an OpenVINO model by elementwise arithmetic: with k = round(y / pi),
    sin(y) = sin((-1)^k (y - k pi)), the argument in [-pi/2, pi/2] where a Taylor polynomial (Horner) equals sin
    to float32 rounding. Returns how many were replaced.

    Why: the CPU plugin runs Sin with its scalar reference kernel, and in bf16 with a precision change on each
    side, and HiFT's Snake activations take the sine of every sample of every channel; these ops are vectorised."""
    import openvino.opset13 as ops

    def const(value):
        return ops.constant(np.float32(value))

    coefficients = [const((-1) ** (n // 2) / math.factorial(n)) for n in range(SIN_DEGREE, 0, -2)]  # r^13 .. r^1
    inv_pi, pi_high, pi_low, one, two = (const(v) for v in (1 / math.pi, PI_HIGH, PI_LOW, 1, 2))
    replaced = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Sin" or node.get_output_element_type(0).get_type_name() != "f32":
            continue
        y = node.input_value(0)
        turns = ops.round(ops.multiply(y, inv_pi), "half_to_even")
        r = ops.subtract(ops.subtract(y, ops.multiply(turns, pi_high)), ops.multiply(turns, pi_low))
        r = ops.multiply(r, ops.subtract(one, ops.multiply(ops.floor_mod(turns, two), two)))
        r2 = ops.multiply(r, r)
        poly = coefficients[0]
        for c in coefficients[1:]:
            poly = ops.add(ops.multiply(poly, r2), c)
        sine = ops.multiply(poly, r)
        sine.set_friendly_name(node.get_friendly_name())
        node.output(0).replace(sine.output(0))
        replaced += 1
    if replaced:
        model.validate_nodes_and_infer_types()
    return replaced


GRAPH_PASSES = (polynomial_sin,)  # applied to every traced graph before it is saved


def int8_matmul_weights(model) -> int:
    """Store the constant weights of every MatMul as int8 with one float32 scale per output channel (symmetric,
    the channel's largest magnitude at 127), multiplied back in the graph. Returns how many were stored so.

    Why: the CPU plugin recognises that pattern and keeps such weights compressed in its matmul kernels, where it
    would otherwise hold a bf16 copy it repacked (half the resident weights), and multiplies them in int8 with
    activations it quantizes per call (INT8_GROUP)."""
    import openvino as ov
    import openvino.opset13 as ops

    stored = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MatMul":
            continue
        source = node.input_value(1).get_node()
        constant = source.input_value(0).get_node() if source.get_type_name() == "Convert" else source
        if constant.get_type_name() != "Constant" or len(constant.get_output_shape(0)) != 2:
            continue
        weight = constant.get_data().astype(np.float32)  # (out, in) with transpose_b, else (in, out)
        axis = 1 if node.get_attributes()["transpose_b"] else 0
        scale = np.abs(weight).max(axis=axis, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        quantized = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
        widened = ops.multiply(ops.convert(ops.constant(quantized), ov.Type.f32), ops.constant(scale))
        node.input(1).replace_source_output(widened.output(0))
        stored += 1
    if stored:
        model.validate_nodes_and_infer_types()
    return stored


def stage_dir(cache_root: Path, stage: str, fingerprint: str, weights: str = "f16") -> Path:
    name = f"{stage}-{fingerprint}-{graph_id(stage)}-{weights}"
    return Path(cache_root) / "compiled" / f"openvino-{available()}" / name


def ensure_converted(stage: str, directory: Path, model_dir, weights: str = "f16", threads: int = 0) -> bool:
    """directory/model.xml exists afterwards; returns True when this call converted it. The conversion runs in a
    child process: tracing needs the float32 network and much scratch memory, which a serving worker would keep.
    ``threads``: the child's torch threads (0 = torch's default), given on its command line like the rest of its
    input, so that it reads no environment variable."""
    if (directory / "model.xml").is_file():
        return False
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be converting the same model right now
        if (directory / "model.xml").is_file():
            return False
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            proc = subprocess.run([sys.executable, "-m", __name__, stage, str(model_dir), str(work), weights,
                                   str(int(threads))],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"conversion of {stage} failed (exit {proc.returncode}): {last}")
            os.replace(work, directory)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log.info("openvino: converted %s in %.1f s -> %s", stage, time.perf_counter() - started, directory)
        return True


def unmap_file_pages(directory: Path | None) -> None:
    """madvise(MADV_DONTNEED) every read-only mapping of a file under ``directory``: the data stays in the file and
    the page cache; this process just stops holding the pages. A writable mapping is left alone (dropping its
    pages would lose what was written to them)."""
    from ..model.mapping import drop_pages, file_mappings

    if directory is None:
        return
    prefix = str(Path(directory).resolve()) + os.sep
    for lo, hi, permissions, _, path in file_mappings():
        if path.startswith(prefix) and "w" not in permissions:
            drop_pages(lo, hi)


def compile_stage(stage: str, directory: Path, precision: str, threads: int, embed_time=None, example=None):
    """Compile directory/model.xml for this CPU; the blob cache next to it makes a second start a file read.
    ``example``: inputs of one call (the compiled model's own: the estimator's take the time embedding), run once
    at once (see _Runner.prime)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": int(threads),
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "CACHE_DIR": str(directory / "blobs"),
              "ENABLE_CPU_PINNING": False,  # the torch stages share these cores
              # kernels kept per input shape: every chunk length is a new shape, and the default (thousands)
              # lets a worker's memory grow with each one; the streamed chunk sizes repeat, so a few suffice
              "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_SHAPES,
              # matmuls with int8 weights (int8_matmul_weights) quantize their activations per call, in groups of
              # this many inputs, and multiply in int8 (see INT8_GROUP)
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": INT8_GROUP}
    started = time.perf_counter()
    compiled = ov.Core().compile_model(str(directory / "model.xml"), "CPU", config)
    try:
        cached = bool(compiled.get_property("LOADED_FROM_CACHE"))
    except Exception:
        cached = False
    log.info("openvino: %s %s %s in %.2f s (%d threads)", stage, precision,
             "loaded from the compiled cache" if cached else "compiled", time.perf_counter() - started, threads)
    runner = (EstimatorRunner(compiled, precision, stage, embed_time) if stage == "estimator"
              else HiftBodyRunner(compiled, precision, stage))
    runner.files = directory
    if example is not None:
        started = time.perf_counter()
        runner.prime(*example)
        log.info("openvino: %s primed in %.2f s", stage, time.perf_counter() - started)
    return runner


def _convert_main(stage: str, model_dir: str, out_dir: str, weights: str) -> None:
    from ..model.loader import load_float32_network

    network = load_float32_network(model_dir, "flow" if stage == "estimator" else "hift")
    convert(stage, network.decoder.estimator if stage == "estimator" else network, Path(out_dir), weights)


if __name__ == "__main__":  # the converter child of ensure_converted: stage model_dir out_dir weights threads
    torch.set_num_threads(int(sys.argv[5]) or torch.get_num_threads())
    _convert_main(*sys.argv[1:5])
