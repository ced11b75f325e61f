#!/usr/bin/env python3
"""What the two ONNX networks of the voice-cloning frontend cost: file size, load time, memory held, run time on a
clip, and memory after release, each through the service's own loading code (frontend/onnx_models.py).

    python scripts/onnx_costs.py --model-dir models/CosyVoice-300M-SFT   # the real files
    python scripts/onnx_costs.py                                        # full-size stand-ins, random weights
    python scripts/onnx_costs.py --threads 2 --json                     # last line: one JSON object

Without --model-dir, networks of the real architectures with random weights (speech_tokenizer_v1: the S3Tokenizer
v1 encoder and codebook as the s3tokenizer package defines it; campplus: CAM++ as 3D-Speaker's speakerlab defines
it) are exported once to the temp directory (~550 MB); that needs the `onnx` package (`pip install onnx`), which
the service does not. Each network is measured in a fresh process set up as the engine sets up its own
(memory.configure_process), so RSS figures are what a serving worker pays. Figures and how they were taken:
docs/performance.md#making-voices.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import OtherLoad, cpu_generation  # noqa: E402

TOKENIZER, SPEAKER_ENCODER = "speech_tokenizer_v1.onnx", "campplus.onnx"
# The files CosyVoice-300M, -SFT and -Instruct ship (sizes and sha256 of their LFS pointers)
REAL_FILES = {TOKENIZER: (522_624_269, "23b5a723ed9143aebfd9ffda14ac4c21231f31c35ef837b6a13bb9e5488abb1e"),
              SPEAKER_ENCODER: (28_303_423, "a6ac6a63997761ae2997373e2ee1c47040854b4b759ea41ec48e4e42df0f4d73")}
RATE = 16000


# --- stand-ins of the real architectures -------------------------------------------------------------------------
# Module names follow s3tokenizer 0.3.0 (S3Tokenizer "speech_tokenizer_v1") and speakerlab 0.0.6 (CAMPPlus), so that
# their state_dicts load into these strictly: same tensors, same shapes, same graph up to the exporter.

def _standin_modules():
    from collections import OrderedDict

    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.query, self.key = nn.Linear(d, d), nn.Linear(d, d, bias=False)
            self.value, self.out = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x, bias):
            b, t, d = x.shape
            scale = (d // self.heads) ** -0.25
            q = self.query(x).view(b, t, self.heads, -1).permute(0, 2, 1, 3) * scale
            k = self.key(x).view(b, t, self.heads, -1).permute(0, 2, 3, 1) * scale
            v = self.value(x).view(b, t, self.heads, -1).permute(0, 2, 1, 3)
            w = torch.softmax(q @ k + bias, dim=-1)
            return self.out((w @ v).permute(0, 2, 1, 3).flatten(2))

    class Block(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.attn, self.attn_ln = Attention(d, heads), nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            self.mlp_ln = nn.LayerNorm(d)

        def forward(self, x, bias):
            x = x + self.attn(self.attn_ln(x), bias)
            return x + self.mlp(self.mlp_ln(x))

    class Encoder(nn.Module):
        def __init__(self, n_mels, ctx, d, heads, layers):
            super().__init__()
            self.conv1 = nn.Conv1d(n_mels, d, 3, padding=1)
            self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
            half = torch.exp(-math.log(10000) / (d // 2 - 1) * torch.arange(d // 2))
            angle = torch.arange(ctx)[:, None] * half[None]
            self.register_buffer("positional_embedding", torch.cat([angle.sin(), angle.cos()], dim=1))
            self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))

    class Codebook(nn.Module):
        def __init__(self, size, d):
            super().__init__()
            self.register_buffer("embed", torch.randn(size, d))

    class Quantizer(nn.Module):
        def __init__(self, size, d):
            super().__init__()
            self._codebook = Codebook(size, d)

    class SpeechTokenizerV1(nn.Module):
        """(1, 128, T) log-mel, (1,) length -> (1, 1, ceil(T / 2)) int64 tokens; at most 1500 tokens (30 s)."""

        def __init__(self, n_mels=128, ctx=1500, d=1280, heads=20, layers=6, codebook=4096):
            super().__init__()
            self.encoder = Encoder(n_mels, ctx, d, heads, layers)
            self.quantizer = Quantizer(codebook, d)

        def forward(self, feats, feats_length):
            e = self.encoder
            n = feats_length.long()
            keep = (torch.arange(feats.shape[2])[None] < n[:, None]).unsqueeze(1).to(feats.dtype)
            x = F.gelu(e.conv1(feats * keep))
            x = F.gelu(e.conv2(x * keep))
            n2 = (n + 1) // 2
            bias = (torch.arange(x.shape[2])[None] >= n2[:, None]).to(x.dtype)[:, None, None] * -1e10
            x = x.permute(0, 2, 1) + e.positional_embedding[: x.shape[2]]
            for block in e.blocks:
                x = block(x, bias)
            x = F.normalize(x, p=2.0, dim=-1)
            codes = self.quantizer._codebook.embed.t()  # both terms from the transpose: one copy in the file
            distance = 2 * x @ codes - codes.pow(2).sum(0)  # -|x - e|^2 up to a term equal for every e
            return distance.argmax(-1).unsqueeze(1)

    def nonlinear(channels, affine=True, relu=True):
        layers = [("batchnorm", nn.BatchNorm1d(channels, affine=affine))] + ([("relu", nn.ReLU())] if relu else [])
        return nn.Sequential(OrderedDict(layers))

    class ResBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=(stride, 1), padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=(stride, 1), bias=False),
                                              nn.BatchNorm2d(cout))

        def forward(self, x):
            return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))

    class Head(nn.Module):  # FCM: a small 2-D ResNet over (frequency, time)
        def __init__(self, m=32):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, m, 3, padding=1, bias=False), nn.BatchNorm2d(m)
            self.layer1 = nn.Sequential(ResBlock(m, m, 2), ResBlock(m, m, 1))
            self.layer2 = nn.Sequential(ResBlock(m, m, 2), ResBlock(m, m, 1))
            self.conv2, self.bn2 = nn.Conv2d(m, m, 3, stride=(2, 1), padding=1, bias=False), nn.BatchNorm2d(m)

        def forward(self, x):
            x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x[:, None])))))
            x = F.relu(self.bn2(self.conv2(x)))
            return x.flatten(1, 2)

    class Conv(nn.Module):  # a Conv1d under `linear`, then `nonlinear`: TDNNLayer, TransitLayer, DenseLayer
        def __init__(self, cin, cout, kernel=1, stride=1, norm_first=False, **nonlinear_args):
            super().__init__()
            self.norm_first = norm_first
            self.nonlinear = nonlinear(cin if norm_first else cout, **nonlinear_args)
            self.linear = nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)

        def forward(self, x):
            return self.linear(self.nonlinear(x)) if self.norm_first else self.nonlinear(self.linear(x))

    class CAMLayer(nn.Module):
        def __init__(self, c, cout, dilation):
            super().__init__()
            self.linear_local = nn.Conv1d(c, cout, 3, padding=dilation, dilation=dilation, bias=False)
            self.linear1, self.linear2 = nn.Conv1d(c, c // 2, 1), nn.Conv1d(c // 2, cout, 1)

        def forward(self, x):
            t = x.shape[-1]
            seg = F.avg_pool1d(x, 100, 100, ceil_mode=True)  # context-aware masking over 100-frame segments
            seg = seg.unsqueeze(-1).expand(*seg.shape, 100).flatten(-2)[..., :t]
            m = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(-1, keepdim=True) + seg))))
            return self.linear_local(x) * m

    class DenseLayer(nn.Module):
        def __init__(self, cin, dilation, growth=32, bn=128):
            super().__init__()
            self.nonlinear1, self.linear1 = nonlinear(cin), nn.Conv1d(cin, bn, 1, bias=False)
            self.nonlinear2, self.cam_layer = nonlinear(bn), CAMLayer(bn, growth, dilation)

        def forward(self, x):
            return torch.cat([x, self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))], dim=1)

    class CAMPPlus(nn.Module):
        """(1, T, 80) fbank -> (1, 192) embedding."""

        def __init__(self, feat_dim=80, embedding=192, growth=32, channels=128):
            super().__init__()
            self.head = Head()
            xvector = [("tdnn", Conv(32 * (feat_dim // 8), channels, 5, stride=2))]
            for i, (layers, dilation) in enumerate(zip((12, 24, 16), (1, 2, 2)), 1):
                block = nn.Sequential(OrderedDict((f"tdnnd{j + 1}", DenseLayer(channels + j * growth, dilation))
                                           for j in range(layers)))
                channels += layers * growth
                xvector += [(f"block{i}", block), (f"transit{i}", Conv(channels, channels // 2, norm_first=True))]
                channels //= 2
            xvector += [("out_nonlinear", nonlinear(channels)),
                        ("dense", Conv(channels * 2, embedding, affine=False, relu=False))]
            self.xvector = nn.Sequential(OrderedDict(xvector))

        def forward(self, x):
            x = self.head(x.permute(0, 2, 1))
            for name, layer in self.xvector.named_children():
                if name == "dense":
                    x = torch.cat([x.mean(-1), x.std(-1)], dim=-1)[..., None]  # statistics pooling
                x = layer(x)
            return x[..., 0]

    return SpeechTokenizerV1, CAMPPlus


def standin_dir() -> Path:
    """Full-size stand-ins in the temp directory, exported once."""
    path = Path(tempfile.gettempdir()) / "cosyvoice_lite_onnx_costs"
    if (path / TOKENIZER).is_file() and (path / SPEAKER_ENCODER).is_file():
        return path
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        raise SystemExit("exporting the stand-ins needs the onnx package (`pip install onnx`); or pass --model-dir "
                         "with the real files") from None
    import warnings

    import torch

    print(f"exporting full-size stand-ins with random weights to {path} (once) ...", file=sys.stderr, flush=True)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tokenizer_cls, campplus_cls = _standin_modules()

    def trained_looking(model):
        # default norms are all ones and zeros, which the exporter stores once for all layers; trained ones differ
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)):
                for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                    if name != "num_batches_tracked":
                        tensor.data = 1 + 0.1 * torch.rand_like(tensor) if name in ("weight", "running_var") \
                            else 0.1 * torch.randn_like(tensor)
        return model.eval()
    for name, model, inputs, names, dynamic in (
            (SPEAKER_ENCODER, trained_looking(campplus_cls()), (torch.randn(1, 200, 80),), (["input"], ["output"]),
             {"input": {1: "T"}}),
            (TOKENIZER, trained_looking(tokenizer_cls()), (torch.randn(1, 128, 300), torch.tensor([300], dtype=torch.int32)),
             (["feats", "feats_length"], ["indices"]), {"feats": {2: "T"}, "indices": {2: "T2"}})):
        partial = path / (name + ".partial")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(model, inputs, str(partial), dynamo=False, opset_version=17,
                              input_names=names[0], output_names=names[1], dynamic_axes=dynamic)
        partial.rename(path / name)
    return path


def onnx_params(path: Path) -> int | None:
    """Numbers stored in the file's initializers (None without the onnx package)."""
    try:
        import onnx
    except ImportError:
        return None
    return sum(math.prod(t.dims) for t in onnx.load(str(path)).graph.initializer)


# --- one network (or the service's voice path) in a process of its own ------------------------------------------

def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS, so the next peak is this step's
    except OSError:
        pass


def clip(seconds: float):
    """A voiced, speech-like 16 kHz clip (harmonics of a wandering pitch under a syllable envelope): what it sounds
    like does not matter, the networks' work depends only on its length."""
    import numpy as np

    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.2 * voice * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def onnxruntime_once() -> dict:
    """Import onnxruntime and open one tiny session (the golden set's stand-in): what the first voice of a process
    adds once and keeps (library, environment, thread pools), apart from what each network costs."""
    before = _status_mb("VmRSS")
    import onnxruntime

    imported = _status_mb("VmRSS")
    tiny = ROOT / "tests" / "golden-modes" / "model" / SPEAKER_ENCODER
    if tiny.is_file():
        onnxruntime.InferenceSession(str(tiny), providers=["CPUExecutionProvider"])
    return {"onnxruntime_import_mb": imported - before, "onnxruntime_first_session_mb": _status_mb("VmRSS") - imported}


def measure_network(args) -> dict:
    import torch

    from cosyvoice_lite.memory import configure_process, release_free_memory

    configure_process(args.torch_threads)  # as CosyVoiceEngine does: large blocks in mappings of their own
    load = OtherLoad()
    from cosyvoice_lite.frontend.onnx_models import SpeakerEncoder, SpeechTokenizer
    from cosyvoice_lite.frontend.prompt_audio import clip_of, speaker_fbank, whisper_log_mel

    result = {"network": args.child, "threads": args.threads, "seconds": args.seconds, **onnxruntime_once()}
    speech = clip_of(clip(args.seconds), RATE).at(RATE)
    started = time.perf_counter()
    feats = (whisper_log_mel(speech) if args.child == TOKENIZER else speaker_fbank(speech)).numpy()
    result["features_s"] = time.perf_counter() - started
    model = (SpeechTokenizer if args.child == TOKENIZER else SpeakerEncoder)(Path(args.model_dir) / args.child,
                                                                             args.threads)
    gc.collect()
    release_free_memory()
    base = _status_mb("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    model.session()
    result["load_s"] = time.perf_counter() - started
    result["rss_loaded_mb"] = _status_mb("VmRSS") - base
    result["rss_load_peak_mb"] = _status_mb("VmHWM") - base
    _reset_peak()
    times = []
    for _ in range(1 + args.repeat):
        started = time.perf_counter()
        out = model(feats)
        times.append(time.perf_counter() - started)
    result["output_shape"] = list(out.shape)
    result["run_first_s"], result["run_s"] = times[0], statistics.median(times[1:])
    result["run_range_s"] = [min(times[1:]), max(times[1:])]
    result["rss_after_runs_mb"] = _status_mb("VmRSS") - base
    result["rss_run_peak_mb"] = _status_mb("VmHWM") - base
    model.close()
    del torch
    return closed(result, base, load)


def measure_voice(args) -> dict:
    """The engine's path (voices.clone.VoiceMaker): both networks opened for one voice from the clip,
    closed after unless kept (KEEP_VOICE_MODELS)."""
    from cosyvoice_lite.memory import configure_process, release_free_memory

    configure_process(args.torch_threads)
    load = OtherLoad()
    onnxruntime_once()  # measured in the network rows
    from cosyvoice_lite.frontend.onnx_models import VoiceFrontend
    from cosyvoice_lite.frontend.prompt_audio import clip_of, prompt_mel, speaker_fbank, whisper_log_mel
    from cosyvoice_lite.voices.clone import clone_features

    audio = clip_of(clip(args.seconds), RATE)
    # torch's first use of each feature's shapes (kernels, buffers) stays with the process, whatever the networks do
    whisper_log_mel(audio.at(RATE))
    speaker_fbank(audio.at(RATE))
    prompt_mel(audio.at(22050), sample_rate=22050)
    frontend = VoiceFrontend(args.model_dir, args.threads)
    gc.collect()
    release_free_memory()
    base = _status_mb("VmRSS")
    result = {"network": "voice", "threads": args.threads, "seconds": args.seconds}
    started = time.perf_counter()
    clone_features(audio, frontend)  # the first voice: both networks load
    result["voice_cold_s"] = time.perf_counter() - started
    result["rss_kept_mb"] = _status_mb("VmRSS") - base
    times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        clone_features(audio, frontend)  # KEEP_VOICE_MODELS: the next voice finds them open
        times.append(time.perf_counter() - started)
    result["voice_kept_s"] = statistics.median(times)
    frontend.close()
    return closed(result, base, load)


def closed(result: dict, base: float, load) -> dict:
    """``result`` with the RSS over ``base`` once the networks are closed (then with the heap trimmed) and the
    others' CPU share during the measurement."""
    from cosyvoice_lite.memory import release_free_memory

    gc.collect()
    result["rss_closed_mb"] = _status_mb("VmRSS") - base
    release_free_memory()
    result["rss_closed_trimmed_mb"] = _status_mb("VmRSS") - base
    result["other_load"] = load.share()
    return result


# --- parent ----------------------------------------------------------------------------------------------------

def run_child(args, network: str) -> dict:
    argv = [sys.executable, __file__, "--child", network, "--model-dir", str(args.model_dir), "--seconds",
            str(args.seconds), "--threads", str(args.threads), "--torch-threads", str(args.torch_threads),
            "--repeat", str(args.repeat)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{network}: measuring process failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def describe_file(path: Path, real: bool) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:  # read once, so that every load below is from the page cache alike
        while f.read(1 << 24):
            pass
    info = {"file": path.name, "file_bytes": size, "params": onnx_params(path), "real_bytes": REAL_FILES[path.name][0]}
    if real:
        import hashlib

        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        info["sha256_matches_release"] = digest.hexdigest() == REAL_FILES[path.name][1]
    return info


def table(results: dict) -> None:
    print(f"\n{results['cpu']} ({results['cpu_generation']}, {results['cpus']} CPUs); onnxruntime "
          f"{results['onnxruntime']}, {results['threads']} intra-op thread(s); {results['seconds']:g} s clip at "
          f"16 kHz; files: {results['files']}")
    head = ("network", "file MB", "params M", "load s", "RSS held MB", "load peak MB", "first run s", "run s",
            "run peak MB", "closed MB", "trimmed MB", "others' CPU")
    rows = []
    for r in results["networks"]:
        rows.append((r["file"], f"{r['file_bytes'] / 1e6:.1f}", f"{r['params'] / 1e6:.2f}" if r["params"] else "-",
                     f"{r['load_s']:.2f}", f"{r['rss_loaded_mb']:+.0f}", f"{r['rss_load_peak_mb']:+.0f}",
                     f"{r['run_first_s']:.3f}", f"{r['run_s']:.3f}", f"{r['rss_run_peak_mb']:+.0f}",
                     f"{r['rss_closed_mb']:+.0f}", f"{r['rss_closed_trimmed_mb']:+.0f}", f"{r['other_load']:.0%}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    for row in (head, *rows):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    v = results["voice"]
    print(f"features ({results['seconds']:g} s): whisper log-mel {results['networks'][0]['features_s']:.3f} s, "
          f"fbank {results['networks'][1]['features_s']:.3f} s; onnxruntime import "
          f"{results['networks'][0]['onnxruntime_import_mb']:+.0f} MB and its first session "
          f"{results['networks'][0]['onnxruntime_first_session_mb']:+.0f} MB (once per process, kept)")
    print(f"a voice from the clip (clone_features, both networks, prompt mel): first {v['voice_cold_s']:.2f} s "
          f"(loads both), next with KEEP_VOICE_MODELS {v['voice_kept_s']:.2f} s; held while kept "
          f"{v['rss_kept_mb']:+.0f} MB, after close {v['rss_closed_mb']:+.0f} MB, trimmed "
          f"{v['rss_closed_trimmed_mb']:+.0f} MB; others' CPU {v['other_load']:.0%}")
    print("RSS columns: increases over the process before the load; 'closed' = after the network's own close() "
          "and gc, 'trimmed' = then malloc_trim (memory.release_free_memory); the voice path closes with "
          "VoiceFrontend.close(), which trims")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="a directory with speech_tokenizer_v1.onnx and campplus.onnx "
                                            "(default: full-size stand-ins with random weights)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (at most 30)")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads (1: as the engine opens them, VoiceFrontend's default)")
    parser.add_argument("--torch-threads", type=int, default=2,
                        help="torch threads for the features (THREADS; 0: leave as they are)")
    parser.add_argument("--repeat", type=int, default=3, help="runs after the first (their median is reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeat = max(1, args.repeat)
    if args.child:
        print(json.dumps(measure_voice(args) if args.child == "voice" else measure_network(args)))
        return 0

    real = args.model_dir is not None
    args.model_dir = Path(args.model_dir) if real else standin_dir()
    missing = [n for n in (TOKENIZER, SPEAKER_ENCODER) if not (args.model_dir / n).is_file()]
    if missing:
        raise SystemExit(f"{args.model_dir} has no {' / '.join(missing)}")
    import onnxruntime

    results = {"cpu": cpu_model(), "cpu_generation": cpu_generation(), "cpus": os.cpu_count(),
               "onnxruntime": onnxruntime.__version__, "threads": args.threads, "seconds": args.seconds,
               "model_dir": str(args.model_dir), "files": "as given" if real else "stand-ins, random weights",
               "networks": []}
    for network in (TOKENIZER, SPEAKER_ENCODER):
        info = describe_file(args.model_dir / network, real)
        print(f"[{network}] ...", file=sys.stderr, flush=True)
        results["networks"].append({**info, **run_child(args, network)})
    print("[voice] ...", file=sys.stderr, flush=True)
    results["voice"] = run_child(args, "voice")
    table(results)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
