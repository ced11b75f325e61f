"""HiFT vocoder parity against the official CosyVoice v1 golden data (tests/golden, or GOLDEN_DIR)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.nn.utils.parametrizations import weight_norm
from golden_data import GOLDEN

from cosyvoice_lite.model import load_model
from cosyvoice_lite.model.config import read_config
from cosyvoice_lite.model.hift import ConvRNNF0Predictor, HiFTGenerator, normalize_hift_state_dict
from cosyvoice_lite.model.loader import build

MODEL_DIR = GOLDEN / "model"
TOL = 1e-3


def _hift_cases():
    manifest = GOLDEN / "manifest.json"
    if not manifest.is_file():
        return ["<golden data missing>"]  # the tests then fail in _load, they are not skipped
    cases = json.loads(manifest.read_text())["cases"]
    return [name for name, case in cases.items() if case["kind"] == "flow+hift"]


CASES = _hift_cases()


def _load(case: str, name: str) -> torch.Tensor:
    path = GOLDEN / case / f"{name}.npy"
    assert path.is_file(), f"golden file {path} is missing"
    return torch.from_numpy(np.load(path))


def _seed(case: str) -> int:
    return json.loads((GOLDEN / "manifest.json").read_text())["cases"][case]["seed"]


def _golden_state() -> dict:
    assert (MODEL_DIR / "hift.pt").is_file(), f"{MODEL_DIR / 'hift.pt'} is missing"
    return torch.load(MODEL_DIR / "hift.pt", map_location="cpu", weights_only=True)


def _hift_config():
    return read_config(MODEL_DIR / "cosyvoice.yaml")["hift"]


def _build(state: dict) -> HiFTGenerator:
    """Only the hift section of the yaml, loaded from a given state dict (for the key-format tests)."""
    hift = build(_hift_config(), "hift")
    hift.load_state_dict(normalize_hift_state_dict(state), strict=True)
    return hift.eval()


@pytest.fixture(scope="module")
def hift() -> HiFTGenerator:
    """The vocoder exactly as the service loads it (whole model directory, strict loads)."""
    hift = load_model(MODEL_DIR).hift
    assert isinstance(hift, HiFTGenerator)
    return hift


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_f0_matches_golden(hift, case):
    ref = _load(case, "hift_f0")
    with torch.inference_mode():
        f0 = hift.predict_f0(_load(case, "mel"))
    # f0 is in Hz (hundreds): allow a few float32 ulps on top of the absolute tolerance
    assert _max_abs(f0, ref) <= TOL + 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_decode_from_saved_source_matches_golden(hift, case):
    with torch.inference_mode():
        wav = hift.decode(_load(case, "mel"), _load(case, "hift_source"))
    assert _max_abs(wav, _load(case, "wav")) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_seeded_source_matches_golden(hift, case):
    """Golden RNG order: manual_seed, flow z = randn_like(mu) (1, 80, F), then the source module's draws."""
    mel = _load(case, "mel")
    torch.manual_seed(_seed(case))
    torch.randn_like(mel)
    with torch.inference_mode():
        source = hift.make_source(_load(case, "hift_f0"))
    assert _max_abs(source, _load(case, "hift_source")) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_seeded_forward_matches_golden(hift, case):
    mel = _load(case, "mel")
    torch.manual_seed(_seed(case))
    torch.randn_like(mel)
    with torch.inference_mode():
        wav, source = hift(mel)
    assert _max_abs(wav, _load(case, "wav")) <= TOL
    assert source.shape == (1, 1, mel.shape[2] * hift.upsample_factor)


def test_source_leaves_rng_where_official_code_does(hift):
    """The official source module draws: Uniform phases (B, H+1, 1), harmonic noise (B, H+1, T), and an unused
    noise branch (B, T, 1); later draws (next segment's LLM sampling) depend on all three being consumed."""
    f0 = _load(CASES[0], "hift_f0")
    batch, samples, harmonics = f0.shape[0], f0.shape[1] * hift.upsample_factor, hift.m_source.l_linear.in_features
    torch.manual_seed(3)
    torch.rand(batch, harmonics, 1), torch.randn(batch, harmonics, samples), torch.randn(batch, samples, 1)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with torch.inference_mode():
        hift.make_source(f0)
    assert torch.equal(torch.rand(4), expected)


def test_cache_source_replaces_source_prefix(hift):
    mel = _load(CASES[0], "mel")
    cache = torch.randn(1, 1, 3 * hift.upsample_factor) * 0.1
    with torch.inference_mode():
        torch.manual_seed(7)
        _, plain = hift(mel)
        torch.manual_seed(7)
        wav, cached = hift(mel, cache_source=cache)
        expected_wav = hift.decode(mel, cached)
    n = cache.shape[2]
    assert torch.equal(cached[:, :, :n], cache)
    assert torch.equal(cached[:, :, n:], plain[:, :, n:])
    assert torch.equal(wav, expected_wav)


def test_upsample_factor_comes_from_config():
    config = _hift_config()
    kwargs = dict(config.kwargs, upsample_rates=[4, 2], upsample_kernel_sizes=[8, 4],
                  istft_params={"n_fft": 8, "hop_len": 2}, f0_predictor=ConvRNNF0Predictor(1, 80, 8))
    torch.manual_seed(0)
    hift = build(dataclasses.replace(config, kwargs=kwargs), "hift").eval()
    with torch.inference_mode():
        wav, source = hift(torch.randn(2, 80, 5))
    assert hift.upsample_factor == 4 * 2 * 2
    assert wav.shape == (2, 5 * 16) and source.shape == (2, 1, 5 * 16)


def _parametrizations_state(legacy: dict) -> dict:
    """A state dict in the new torch format, produced by torch's own weight_norm on a scratch module."""
    scratch = build(_hift_config(), "hift")
    for key in legacy:
        if key.endswith(".weight_g"):
            weight_norm(scratch.get_submodule(key[: -len(".weight_g")]))
    scratch.load_state_dict(legacy, strict=True)  # torch maps weight_g/weight_v onto original0/original1
    return scratch, scratch.state_dict()


def test_all_key_formats_load_to_identical_output():
    legacy = _golden_state()
    scratch, modern = _parametrizations_state(legacy)
    assert any(k.endswith(".parametrizations.weight.original0") for k in modern)
    prefixed = {f"generator.{k}": v for k, v in legacy.items()}
    plain = normalize_hift_state_dict(legacy)
    mel, source = _load(CASES[0], "mel"), _load(CASES[0], "hift_source")
    with torch.inference_mode():
        outputs = [_build(sd).decode(mel, source) for sd in (legacy, modern, prefixed, plain)]
        runtime_weight_norm = scratch.eval().decode(mel, source)  # weight norm computed every call, as officially
    for out in outputs[1:] + [runtime_weight_norm]:
        assert torch.equal(out, outputs[0])


@pytest.mark.parametrize("dropped", ["conv_post.weight_v", "ups.1.weight_g"])
def test_unpaired_legacy_weight_norm_key_raises(dropped):
    state = _golden_state()
    del state[dropped]
    with pytest.raises(ValueError, match=dropped.rsplit(".", 1)[0].replace(".", r"\.")):
        normalize_hift_state_dict(state)


def test_unpaired_parametrizations_key_raises():
    _, state = _parametrizations_state(_golden_state())
    del state["f0_predictor.condnet.4.parametrizations.weight.original1"]
    with pytest.raises(ValueError, match=r"f0_predictor\.condnet\.4"):
        normalize_hift_state_dict(state)


def test_missing_plain_key_fails_strict_load():
    state = normalize_hift_state_dict(_golden_state())
    del state["source_downs.0.bias"]
    hift = build(_hift_config(), "hift")
    with pytest.raises(RuntimeError, match=r"source_downs\.0\.bias"):
        hift.load_state_dict(state, strict=True)


# --- the body in windows (speed modes bound the frames per body call) ---

WINDOW_CONFIGS = {
    "official layout": {},
    "three stages, other kernels": dict(upsample_rates=(8, 4, 2), upsample_kernel_sizes=(16, 8, 4),
                                        resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 2), (1, 2)),
                                        source_resblock_kernel_sizes=(7, 7, 11),
                                        source_resblock_dilation_sizes=((1, 3, 5),) * 3),
}


def _random_hift(seed: int, **layout) -> HiFTGenerator:
    torch.manual_seed(seed)  # PyTorch's initialisation: activations of a trained model's order
    return HiFTGenerator(in_channels=80, base_channels=16, **layout).eval()


@pytest.mark.parametrize("layout", WINDOW_CONFIGS)
@pytest.mark.parametrize("frames", [57, 161, 400])
def test_body_in_windows_gives_the_chunks_output(layout, frames):
    hift = _random_hift(frames, **WINDOW_CONFIGS[layout])
    mel = torch.randn(1, 80, frames)
    source = torch.randn(1, 1, frames * hift.upsample_factor) * 0.1
    with torch.inference_mode():
        whole = hift.decode(mel, source)
        hift.body_window = 2 * hift.body_context + 8  # small windows: 8 frames of their own between the margins
        windows = hift.decode(mel, source)
    assert windows.shape == whole.shape
    assert (windows - whole).abs().max() <= 1e-5 * whole.abs().max()


def test_windows_overlapping_by_less_than_the_receptive_field_change_the_output():
    hift = _random_hift(0)
    mel, source = torch.randn(1, 80, 161), torch.randn(1, 1, 161 * hift.upsample_factor) * 0.1
    with torch.inference_mode():
        whole = hift.decode(mel, source)
        hift.body_window, hift.body_context = 40, 2
        windows = hift.decode(mel, source)
    assert (windows - whole).abs().max() > 1e-3 * whole.abs().max()


def test_body_runs_each_window_within_the_bound():
    hift = _random_hift(0)
    hift.body_window = 60
    calls = []
    body = hift.body

    def counting(mel, s_stft):
        calls.append(mel.shape[2])
        return body(mel, s_stft)

    hift.body_runner = counting
    with torch.inference_mode():
        hift.decode(torch.randn(1, 80, 200), torch.randn(1, 1, 200 * hift.upsample_factor) * 0.1)
    assert len(calls) > 1 and max(calls) <= 60


def test_lean_modes_bound_the_body_and_exact_keeps_whole_chunks():
    assert load_model(GOLDEN / "model", mode="exact").hift.body_window is None
    assert load_model(GOLDEN / "model", mode="default").hift.body_window == 160
