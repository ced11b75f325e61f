"""Execution backends: the CPU features they read, the runtime and precision each mode gets, and the numerics of
every backend/precision against the float32 PyTorch reference on the tiny golden model. Speed is measured by
scripts/bench.py, never here."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from golden_data import GOLDEN
from golden_data import GOLDEN_MODEL as MODEL_DIR

from cosyvoice_lite.backends import Stage, accelerate, external_paths, plan, runtime_plan, torch_plan
from cosyvoice_lite.backends.cpu import CpuInfo, cpu_info, limited, parse_cpuinfo
from cosyvoice_lite.backends.ov_runtime import available
from cosyvoice_lite.model import load_model
from cosyvoice_lite.model.layers import Fp16Linear
from cosyvoice_lite.model.modes import mode_settings

# the golden set's flow cases (other golden sets have other names and sizes)
FLOW_CASES = sorted(name for name, case in json.loads((GOLDEN / "manifest.json").read_text())["cases"].items()
                    if case.get("kind", "").startswith("flow"))

ZEN4 = CpuInfo("AMD EPYC 9R14", "x86_64", 2, ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"))
AVX2 = CpuInfo("Intel Xeon E5-2686 v4", "x86_64", 2, ("avx2", "fma"))

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm asimddp i8mm bf16
CPU implementer\t: 0x41
"""


def rel(a, b):
    return float((a - b).norm() / b.norm())


def case_inputs(case):
    load = lambda name: torch.from_numpy(np.load(GOLDEN / case / f"{name}.npy"))  # noqa: E731
    return load("speech_token").long().reshape(1, -1), load("embedding").float(), load("z"), load("mel")


# ---- CPU features and the plan -------------------------------------------------------------------------------

def test_x86_flags_decide_native_bf16_and_int8():
    model, features = parse_cpuinfo(X86_CPUINFO, "x86_64")
    cpu = CpuInfo(model, "x86_64", 2, features)
    assert model == "Intel(R) Xeon(R) Platinum 8488C"
    assert {"avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni"} <= set(features)
    assert cpu.native_bf16 and cpu.fast_int8
    assert not AVX2.native_bf16 and not AVX2.fast_int8


def test_arm_features_decide_native_bf16_and_int8():
    _, features = parse_cpuinfo(ARM_CPUINFO, "aarch64")
    cpu = CpuInfo("", "aarch64", 4, features)
    assert {"bf16", "i8mm", "asimddp"} <= set(features)
    assert cpu.native_bf16 and cpu.fast_int8


def test_this_cpu_is_described_from_proc_cpuinfo():
    info = cpu_info()
    assert info.model and info.cores >= 1
    if Path("/proc/cpuinfo").is_file() and info.arch == "x86_64":
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].splitlines()[0].split()
        assert ("avx2" in info.features) == ("avx2" in flags)


def test_onednn_max_cpu_isa_hides_the_features_above_it():
    _, features = parse_cpuinfo(X86_CPUINFO, "x86_64")
    assert limited(features, "x86_64", "avx2") == (("avx2", "fma"), "AVX2")
    assert limited(features, "x86_64", "AVX512_CORE_VNNI") == (("avx2", "fma", "avx512f", "avx512_vnni"),
                                                               "AVX512_CORE_VNNI")
    for no_limit in (None, "", "ALL", "DEFAULT", "AVX10_2_512", "not-an-isa"):
        assert limited(features, "x86_64", no_limit) == (features, None)
    assert limited(ZEN4.features, "x86_64", "AVX512_CORE_AMX") == (ZEN4.features, None)  # nothing to hide


@pytest.mark.parametrize("caps", [{"ONEDNN_MAX_CPU_ISA": "AVX2", "OV_CPU_MAX_ISA": "AVX2"},
                                  {"OV_CPU_MAX_ISA": "AVX2"}, {"ONEDNN_MAX_CPU_ISA": "ALL", "OV_CPU_MAX_ISA": "AVX2"}])
def test_a_process_started_with_an_avx2_cap_sees_no_avx512(caps):
    code = "from cosyvoice_lite.backends.cpu import cpu_info; print(' '.join(cpu_info().features))"
    env = {**{k: v for k, v in os.environ.items() if not k.endswith("_MAX_CPU_ISA")}, **caps}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert not [name for name in out if name.startswith(("avx512", "amx"))]
    assert ("avx2" in out) == ("avx2" in cpu_info().features)


def test_a_bf16_cpu_limited_to_avx2_gets_the_avx2_plan():
    features, isa_limit = limited(ZEN4.features, "x86_64", "AVX2")
    cpu = CpuInfo(ZEN4.model, "x86_64", 2, features, isa_limit)
    assert not cpu.native_bf16 and cpu.as_dict()["isa_limit"] == "AVX2"
    assert plan(mode_settings("default"), cpu) == plan(mode_settings("default"), AVX2)


def test_exact_mode_is_float32_pytorch_everywhere():
    stages = plan(mode_settings("exact"), ZEN4)
    assert {str(s) for s in stages.values()} == {"torch fp32"}


def test_default_mode_on_a_bf16_cpu_runs_flow_and_hift_in_openvino_bf16_the_flows_matmuls_in_int8():
    stages = plan(mode_settings("default"), ZEN4)
    assert str(stages["flow_estimator"]) == "openvino bf16, int8 matmuls" and str(stages["hift"]) == "openvino bf16"
    assert str(stages["llm"]) == "torch int8"


def test_the_lean_modes_on_an_avx2_cpu_stay_in_torch():
    for mode in ("default", "fast"):
        assert plan(mode_settings(mode), AVX2) == torch_plan(mode_settings(mode))


def test_a_cpu_without_native_bf16_says_why_it_stays_in_pytorch(caplog):
    if available() is None:
        pytest.skip("openvino not installed")
    with caplog.at_level(logging.INFO, logger="cosyvoice_lite.backends"):
        runtime_plan(mode_settings("default"), "auto", AVX2)
    assert any("no native bf16" in r.getMessage() and "BACKEND=openvino" in r.getMessage() for r in caplog.records)


def test_backend_openvino_on_an_avx2_cpu_runs_the_estimator_in_openvino_float32_and_hift_in_torch():
    stages = plan(mode_settings("default"), AVX2, "openvino")
    assert str(stages["flow_estimator"]) == "openvino fp32" and stages["hift"].runtime == "torch"


def test_backend_torch_or_a_missing_openvino_keeps_every_stage_in_torch():
    for stages in (plan(mode_settings("fast"), ZEN4, "torch"), plan(mode_settings("fast"), ZEN4, openvino=False)):
        assert {s.runtime for s in stages.values()} == {"torch"}
    with pytest.raises(ValueError, match="BACKEND"):
        plan(mode_settings("default"), ZEN4, "cuda")


# ---- numerics against float32 PyTorch --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exact():
    return load_model(MODEL_DIR)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def accelerated(mode, cache, cpu, backend="auto"):
    model = load_model(MODEL_DIR, mode=mode)
    model.runtime = accelerate(model, mode_settings(mode), MODEL_DIR, backend, cache_root=cache, threads=2, cpu=cpu)
    return model


@pytest.fixture(scope="module")
def ov_bf16(cache):
    return accelerated("default", cache, ZEN4)


@pytest.fixture(scope="module")
def ov_fp32(cache):
    return accelerated("default", cache, AVX2, "openvino")


# bounds on the norm-relative error against float32 PyTorch (one estimator call; the whole flow from the same
# tokens and noise; HiFT's body from the same mel and excitation)
BOUNDS = {"bf16": {"estimator": 3e-2, "mel": 2e-2, "wav": 2e-2},
          "fp32": {"estimator": 2e-3, "mel": 2e-3}}


def run_estimator(model, case):
    load = lambda name: torch.from_numpy(np.load(GOLDEN / case / f"{name}.npy"))  # noqa: E731
    names = ("est_step1_x", "est_step1_mask", "est_step1_mu", "est_step1_t", "est_step1_spks", "est_step1_cond")
    with torch.inference_mode():
        return model.flow.decoder.estimator(*(load(n) for n in names))


@pytest.mark.parametrize("case", FLOW_CASES)
def test_openvino_bf16_flow_and_vocoder_stay_near_float32(exact, ov_bf16, case):
    if not cpu_info().native_bf16:
        pytest.skip("this CPU has no native bf16: OpenVINO would emulate it")
    if not ov_bf16.runtime["stages"]["flow_estimator"].startswith("openvino bf16"):
        pytest.skip("openvino not installed")
    token, embedding, z, golden_mel = case_inputs(case)
    assert rel(run_estimator(ov_bf16, case), run_estimator(exact, case)) < BOUNDS["bf16"]["estimator"]
    with torch.inference_mode():
        ref = exact.flow.inference(token, embedding, noise=z)
        ours = ov_bf16.flow.inference(token, embedding, noise=z)
        assert rel(ours, ref) < BOUNDS["bf16"]["mel"]
        source = exact.hift.make_source(exact.hift.predict_f0(ref), torch.Generator().manual_seed(0))
        assert rel(ov_bf16.hift.decode(ref, source), exact.hift.decode(ref, source)) < BOUNDS["bf16"]["wav"]


def test_int8_matmul_weights_keep_each_output_channel_within_half_a_step_of_its_scale():
    ov = pytest.importorskip("openvino")
    from cosyvoice_lite.backends.ov_runtime import int8_matmul_weights

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((24, 16)) * np.geomspace(1e-3, 10, 24)[:, None]).astype(np.float32)  # (out, in)
    x = ov.opset13.parameter([-1, 16], np.float32)
    model = ov.Model([ov.opset13.matmul(x, ov.opset13.constant(weight), False, True)], [x])
    assert int8_matmul_weights(model) == 1
    assert {c.get_element_type().get_type_name() for c in model.get_ops() if c.get_type_name() == "Constant"} \
        == {"i8", "f32"}
    rows = np.eye(16, dtype=np.float32)  # each output row is then the weight's column, as the graph holds it
    ours = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})([rows])[0]
    step = np.abs(weight).max(axis=1) / 127  # per output channel
    assert (np.abs(ours - weight.T) <= step / 2 * (1 + 1e-5)).all()


def test_the_backends_sine_equals_float32_sine_over_a_wide_range():
    ov = pytest.importorskip("openvino")
    from cosyvoice_lite.backends.ov_runtime import polynomial_sin

    y = ov.opset13.parameter([-1], np.float32)
    model = ov.Model([ov.opset13.sin(y)], [y])
    assert polynomial_sin(model) == 1
    assert "Sin" not in {op.get_type_name() for op in model.get_ops()}
    values = np.concatenate([np.linspace(-1000, 1000, 200_001), np.geomspace(1e-30, 1e3, 2000),
                             -np.geomspace(1e-30, 1e3, 2000), [0.0]]).astype(np.float32)
    ours = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})([values])[0]
    exact = np.sin(values.astype(np.float64))
    assert np.abs(ours - exact).max() < 3e-7  # a few float32 steps at 1
    small = np.abs(values) < 1e-3
    assert np.all(np.abs(ours[small] - exact[small]) <= 2e-7 * np.abs(exact[small]))  # relative, near 0


def test_openvino_float32_vocoder_matches_float32_pytorch(exact, tmp_path):
    stages = {**torch_plan(mode_settings("exact")), "hift": Stage("openvino", "fp32")}
    model = load_model(MODEL_DIR)
    info = accelerate(model, mode_settings("exact"), MODEL_DIR, cache_root=tmp_path, threads=2, stages=stages)
    if info["stages"]["hift"] != "openvino fp32":
        pytest.skip("openvino not installed")
    mel = torch.randn(1, 80, 60, generator=torch.Generator().manual_seed(4))
    source = exact.hift.make_source(exact.hift.predict_f0(mel), torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert rel(model.hift.decode(mel, source), exact.hift.decode(mel, source)) < 1e-5


@pytest.mark.parametrize("case", FLOW_CASES)
def test_openvino_float32_flow_matches_float32_pytorch(exact, ov_fp32, case):
    if ov_fp32.runtime["stages"]["flow_estimator"] != "openvino fp32":
        pytest.skip("openvino not installed")
    token, embedding, z, _ = case_inputs(case)
    assert rel(run_estimator(ov_fp32, case), run_estimator(exact, case)) < BOUNDS["fp32"]["estimator"]
    with torch.inference_mode():
        assert rel(ov_fp32.flow.inference(token, embedding, noise=z),
                   exact.flow.inference(token, embedding, noise=z)) < BOUNDS["fp32"]["mel"]


CAPPED_RUN = """
import sys, numpy as np, torch
sys.path.insert(0, "tests")
from golden_data import GOLDEN, GOLDEN_MODEL
from cosyvoice_lite.backends import accelerate
from cosyvoice_lite.model import load_model
from cosyvoice_lite.model.modes import mode_settings
load = lambda name: torch.from_numpy(np.load(GOLDEN / sys.argv[1] / f"{name}.npy"))
inputs = [load(n) for n in ("est_step1_x", "est_step1_mask", "est_step1_mu", "est_step1_t", "est_step1_spks",
                            "est_step1_cond")]
exact, model = load_model(GOLDEN_MODEL), load_model(GOLDEN_MODEL, mode="default")
info = accelerate(model, mode_settings("default"), GOLDEN_MODEL, "openvino", cache_root=sys.argv[2], threads=2)
with torch.inference_mode():
    a, b = model.flow.decoder.estimator(*inputs), exact.flow.decoder.estimator(*inputs)
print(info["stages"]["flow_estimator"], float((a - b).norm() / b.norm()))
"""


def test_openvino_capped_at_avx2_through_onednns_variable_alone_runs_near_float32(tmp_path):
    if available() is None:
        pytest.skip("openvino not installed")
    env = {**{k: v for k, v in os.environ.items() if not k.endswith("_MAX_CPU_ISA")}, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run([sys.executable, "-c", CAPPED_RUN, FLOW_CASES[0], str(tmp_path)], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    stage, error = proc.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert stage == "openvino fp32" and float(error) < BOUNDS["fp32"]["estimator"]


def test_compiled_estimator_takes_any_batch_and_length(exact, ov_fp32):
    if ov_fp32.runtime["stages"]["flow_estimator"] != "openvino fp32":
        pytest.skip("openvino not installed")
    generator = torch.Generator().manual_seed(3)
    for batch, frames in ((2, 17), (6, 301)):
        x, mu, cond = (torch.randn(batch, 80, frames, generator=generator) for _ in range(3))
        args = (x, torch.ones(batch, 1, frames), mu, torch.rand(batch, generator=generator),
                torch.randn(batch, 80, generator=generator), cond)
        with torch.inference_mode():
            ours, ref = ov_fp32.flow.decoder.estimator(*args), exact.flow.decoder.estimator(*args)
        assert ours.shape == ref.shape == (batch, 80, frames)
        assert rel(ours, ref) < BOUNDS["fp32"]["estimator"]


# ---- the disk cache and the fallback ----------------------------------------------------------------------------

def test_second_load_reuses_the_converted_and_compiled_models(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cosyvoice_lite.backends")
    first = accelerated("default", tmp_path, ZEN4)
    if first.runtime["backend"] != "openvino":
        pytest.skip("openvino not installed")
    assert sum("converted" in r.getMessage() for r in caplog.records) == 2  # estimator and HiFT
    files = sorted(tmp_path.glob("compiled/*/*/model.xml"))
    stamps = [f.stat().st_mtime_ns for f in files]
    caplog.clear()
    second = accelerated("default", tmp_path, ZEN4)
    messages = [r.getMessage() for r in caplog.records]
    assert not any("converted" in m for m in messages)
    assert sum("loaded from the compiled cache" in m for m in messages) == 2
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert second.runtime == first.runtime


def test_backend_torch_runs_the_pytorch_modules_unchanged(tmp_path):
    token, embedding, z, _ = case_inputs(FLOW_CASES[0])
    torch_model = load_model(MODEL_DIR, mode="default")
    model = load_model(MODEL_DIR, mode="default")
    info = accelerate(model, mode_settings("default"), MODEL_DIR, backend="torch", cache_root=tmp_path, cpu=ZEN4)
    assert info["backend"] == "torch" and not (tmp_path / "compiled").exists()
    with torch.inference_mode():
        assert torch.equal(model.flow.inference(token, embedding, noise=z),
                           torch_model.flow.inference(token, embedding, noise=z))


def test_a_lean_pytorch_vocoder_gives_the_same_audio_window_by_window_once_accelerated(tmp_path):
    """Where HiFT stays in PyTorch (an AVX2 CPU) its windows give their memory back between them: same samples."""
    plain = load_model(MODEL_DIR, mode="default")
    model = load_model(MODEL_DIR, mode="default")
    accelerate(model, mode_settings("default"), MODEL_DIR, cache_root=tmp_path, cpu=AVX2)
    frames = 3 * plain.hift.body_window  # several windows
    mel = torch.randn(1, plain.hift.conv_pre.in_channels, frames, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, _ = model.hift(mel, generator=torch.Generator().manual_seed(1))
        ref, _ = plain.hift(mel, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours, ref)


def test_an_unusable_cache_directory_falls_back_to_pytorch_and_says_so(tmp_path, caplog):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    model = load_model(MODEL_DIR, mode="default")
    with caplog.at_level(logging.WARNING, logger="cosyvoice_lite.backends"):
        info = accelerate(model, mode_settings("default"), MODEL_DIR, cache_root=blocked, cpu=ZEN4)
    assert info["backend"] == "torch"
    assert {info["stages"]["flow_estimator"], info["stages"]["hift"]} == {"torch fp16", "torch fp32"}
    assert any("stays in PyTorch" in r.getMessage() for r in caplog.records)
    token, embedding, z, _ = case_inputs(FLOW_CASES[0])
    with torch.inference_mode():
        assert model.flow.inference(token, embedding, noise=z).shape[2] == case_inputs(FLOW_CASES[0])[3].shape[2]


def built_for(stages, mode="default"):
    return load_model(MODEL_DIR, mode=mode, external=external_paths(stages))


def test_what_openvino_will_run_is_built_float32_and_the_rest_in_the_mode():
    model = built_for(plan(mode_settings("default"), ZEN4))
    estimator = model.flow.decoder.estimator
    body = [m for part in (estimator.down_blocks, estimator.mid_blocks, estimator.up_blocks) for m in part.modules()]
    assert any(type(m) is nn.Linear for m in body) and not any(type(m) is Fp16Linear for m in body)
    assert type(estimator.time_mlp.linear_1) is Fp16Linear  # the time embedding stays in PyTorch, in the mode
    assert all(type(m) is Fp16Linear for m in model.flow.encoder.modules() if isinstance(m, (nn.Linear, Fp16Linear)))
    assert type(model.hift.resblocks[0].convs1[0]) is nn.Conv1d
    assert type(model.hift.f0_predictor.condnet[0]) is not nn.Conv1d  # time-major, as the mode has it
    avx2 = built_for(plan(mode_settings("default"), AVX2))  # HiFT stays in PyTorch there: built in the mode
    assert type(avx2.hift.resblocks[0].convs1[0]) is not nn.Conv1d


def test_a_model_built_for_openvino_gives_the_audio_of_one_converted_after_loading(tmp_path):
    stages = plan(mode_settings("default"), ZEN4)
    built = built_for(stages)
    info = accelerate(built, mode_settings("default"), MODEL_DIR, cache_root=tmp_path, threads=2, cpu=ZEN4, stages=stages)
    if info["backend"] != "openvino":
        pytest.skip("openvino not installed")
    converted = accelerated("default", tmp_path, ZEN4)
    token, embedding, z, _ = case_inputs(FLOW_CASES[0])
    with torch.inference_mode():
        mel = built.flow.inference(token, embedding, noise=z)
        assert torch.equal(mel, converted.flow.inference(token, embedding, noise=z))
        wavs = []
        for model in (built, converted):
            torch.manual_seed(0)  # HiFT's excitation draws noise
            wavs.append(model.mel_to_wav(mel[:, :, :40]))
        assert torch.equal(*wavs)


def test_a_stage_built_for_openvino_that_cannot_run_there_runs_float32_pytorch(tmp_path, caplog):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    stages = plan(mode_settings("default"), ZEN4)
    model = built_for(stages)
    with caplog.at_level(logging.WARNING, logger="cosyvoice_lite.backends"):
        info = accelerate(model, mode_settings("default"), MODEL_DIR, cache_root=blocked, cpu=ZEN4, stages=stages)
    assert (info["stages"]["flow_estimator"], info["stages"]["hift"]) == ("torch fp32", "torch fp32")
    token, embedding, z, mel = case_inputs(FLOW_CASES[0])
    with torch.inference_mode():
        assert model.flow.inference(token, embedding, noise=z).shape == mel.shape


def test_ready_shows_the_runtime_precision_per_stage_and_cpu_features(make_app, cosyvoice_engine):
    body = make_app(cosyvoice_engine).test_client().get("/ready").json
    runtime = body["runtime"]
    assert set(runtime["stages"]) == {"llm", "flow_encoder", "flow_estimator", "hift"}
    assert runtime["cpu"] == cpu_info().model and runtime["cpu_features"] == list(cpu_info().features)
    assert runtime["cpu_isa_limit"] == cpu_info().isa_limit
    assert runtime["backend"] in ("openvino", "torch")


def test_a_deferred_backend_compiles_in_the_process_that_synthesises(tmp_path):
    # the service builds its engine in gunicorn's master and forks: OpenVINO's threads would not survive that
    from cosyvoice_lite.engines.cosyvoice import CosyVoiceEngine

    engine = CosyVoiceEngine(MODEL_DIR, backend="auto", cache_root=tmp_path, defer_backend=True)
    try:
        assert not (tmp_path / "compiled").exists()
        assert isinstance(engine.model.flow.decoder.estimator, nn.Module)
        planned = engine.runtime["stages"]
        samples = sum(chunk.size for chunk in engine.speak("Hello there."))
        assert samples > 0
        assert engine.runtime["stages"] == planned  # the plan held: every stage runs where it was planned
        if engine.runtime["backend"] == "openvino":
            assert list(tmp_path.glob("compiled/*/*/model.xml"))
            assert "openvino" in repr(engine.model.flow.decoder.estimator)
    finally:
        engine.scheduler.close()


# ---- memory the compiled models hold ----------------------------------------------------------------------------

def resident_kb_of_files_under(directory):
    """Rss (kB) of this process's mappings of files under `directory`, from /proc/self/smaps."""
    prefix, total, inside = str(Path(directory).resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[-1].startswith(prefix)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs /proc/self/smaps")
def test_a_compiled_model_holds_none_of_its_files_pages_once_primed(tmp_path):
    model = accelerated("default", tmp_path, ZEN4)
    if model.runtime["backend"] != "openvino":
        pytest.skip("openvino not installed")
    assert list(tmp_path.glob("compiled/*/*/model.bin"))
    assert resident_kb_of_files_under(tmp_path / "compiled") == 0


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps")
def test_dropping_file_pages_leaves_writable_mappings_alone(tmp_path):
    import mmap

    from cosyvoice_lite.backends.ov_runtime import unmap_file_pages

    path = tmp_path / "data.bin"
    path.write_bytes(bytes(4 * mmap.PAGESIZE))
    with open(path, "r+b") as f:
        private = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)  # writes stay in this process's pages
        readonly = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    private[:5] = b"hello"
    assert readonly[0] == 0
    unmap_file_pages(tmp_path)
    assert private[:5] == b"hello" and readonly[:5] == bytes(5)
    assert path.read_bytes()[:5] == bytes(5)
    private.close()
    readonly.close()


def test_the_compiled_vocoder_gives_the_same_audio_after_a_longer_chunk(exact, ov_bf16):
    if ov_bf16.runtime["stages"]["hift"] != "openvino bf16":
        pytest.skip("openvino not installed or HiFT not compiled on this plan")
    generator = torch.Generator().manual_seed(5)
    short, long = torch.randn(1, 80, 30, generator=generator), torch.randn(1, 80, 90, generator=generator)
    sources = {mel.shape[2]: exact.hift.make_source(exact.hift.predict_f0(mel), torch.Generator().manual_seed(0))
               for mel in (short, long)}
    with torch.inference_mode():
        before = ov_bf16.hift.decode(short, sources[30])
        ov_bf16.hift.decode(long, sources[90])
        assert torch.equal(ov_bf16.hift.decode(short, sources[30]), before)


def test_the_compiled_estimator_gives_the_same_velocity_after_releasing_its_buffers(ov_fp32):
    if ov_fp32.runtime["stages"]["flow_estimator"] != "openvino fp32":
        pytest.skip("openvino not installed")
    estimator = ov_fp32.flow.decoder.estimator
    generator = torch.Generator().manual_seed(7)

    def inputs(batch, frames):
        return (torch.randn(batch, 80, frames, generator=generator), torch.ones(batch, 1, frames),
                torch.randn(batch, 80, frames, generator=generator), torch.rand(batch, generator=generator),
                torch.randn(batch, 80, generator=generator), torch.randn(batch, 80, frames, generator=generator))

    small, large = inputs(2, 40), inputs(8, 120)
    with torch.inference_mode():
        before = estimator(*small)
        estimator(*large)
        estimator.release_buffers()
        assert torch.equal(estimator(*small), before)


def test_a_batch_beyond_the_estimators_rows_per_call_gives_the_velocity_of_one_call(ov_fp32, monkeypatch):
    if ov_fp32.runtime["stages"]["flow_estimator"] != "openvino fp32":
        pytest.skip("openvino not installed")
    estimator = ov_fp32.flow.decoder.estimator
    generator = torch.Generator().manual_seed(8)
    batch, frames = 6, 50
    args = (torch.randn(batch, 80, frames, generator=generator), torch.ones(batch, 1, frames),
            torch.randn(batch, 80, frames, generator=generator), torch.rand(batch, generator=generator),
            torch.randn(batch, 80, generator=generator), torch.randn(batch, 80, frames, generator=generator))
    with torch.inference_mode():
        whole = estimator(*args)
        monkeypatch.setattr(estimator, "row_frames", 2 * frames)  # three calls of two rows
        sliced = estimator(*args)
    assert sliced.shape == whole.shape and rel(sliced, whole) < 1e-5


def test_the_compiled_vocoder_in_windows_stays_near_float32_on_a_long_chunk(exact, ov_bf16):
    if ov_bf16.runtime["stages"]["hift"] != "openvino bf16":
        pytest.skip("openvino not installed or HiFT not compiled on this plan")
    mel = torch.randn(1, 80, 400, generator=torch.Generator().manual_seed(9))
    source = exact.hift.make_source(exact.hift.predict_f0(mel), torch.Generator().manual_seed(0))
    assert ov_bf16.hift.body_window and ov_bf16.hift.body_window < 400
    with torch.inference_mode():
        assert rel(ov_bf16.hift.decode(mel, source), exact.hift.decode(mel, source)) < BOUNDS["bf16"]["wav"]
