"""The flow/HiFT layers of the non-exact speed modes (speed.TimeMajorConv1d, speed.ExpMish): same functions as the
float32 modules they replace, in any input layout. Speed is never asserted (scripts/bench.py measures it)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from golden_data import GOLDEN_MODEL

from cosyvoice_lite.model import load_model
from cosyvoice_lite.model.speed import ExpMish, Int8Conv1d, TimeMajorConv1d, replace_mish, time_major_convs

MODEL_DIR = GOLDEN_MODEL


def rel(a, b):
    return float((a - b).norm() / b.norm())


def time_major(x):
    """The same (B, C, T) values with (B, T, C) memory."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


CONVS = [
    nn.Conv1d(16, 24, 3, padding=1),
    nn.Conv1d(16, 16, 11, dilation=3, padding=15),
    nn.Conv1d(16, 8, 1, bias=False),
    nn.Conv1d(16, 16, 4, stride=2, padding=1, groups=4),
    nn.ConvTranspose1d(16, 8, 16, 8, padding=4),
    nn.ConvTranspose1d(16, 16, 4, 2, 1),
    nn.ConvTranspose1d(16, 8, 3, 2, 1, output_padding=1),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: repr(c))
@pytest.mark.parametrize("layout", ["contiguous", "time-major"])
def test_time_major_conv_computes_the_same_convolution(conv, layout):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 37)
    with torch.no_grad():
        ref = conv(x)
        ours = TimeMajorConv1d(conv)(time_major(x) if layout == "time-major" else x)
    assert ours.shape == ref.shape
    assert ours.stride(1) == 1  # output memory is time-major
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_time_major_convs_replaces_plain_convs_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.Sequential(nn.ConvTranspose1d(8, 8, 4, 2, 1)),
                        Int8Conv1d(nn.Conv1d(8, 8, 3, padding=1)))
    x = torch.randn(1, 4, 20)
    with torch.no_grad():
        ref = net(x)
        assert time_major_convs(net) == 2
        assert isinstance(net[2], Int8Conv1d)
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
        assert time_major_convs(net) == 0  # already converted


def test_exp_mish_is_mish_without_overflow():
    x = torch.cat([torch.linspace(-30, 30, 10001), torch.tensor([-1e4, -100.0, 19.9, 20.0, 20.1, 100.0, 1e4])])
    ours = ExpMish()(x)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, F.mish(x), rtol=1e-6, atol=1e-6)
    net = nn.Sequential(nn.Mish(), nn.Sequential(nn.Linear(2, 2), nn.Mish()))
    assert replace_mish(net) == 2 and isinstance(net[1][1], ExpMish)


@pytest.fixture(scope="module")
def exact():
    return load_model(MODEL_DIR)


@pytest.mark.parametrize("mode", ["default", "fast"])
def test_non_exact_modes_run_flow_and_hift_convolutions_time_major(mode):
    model = load_model(MODEL_DIR, mode=mode)
    for module in (model.flow.decoder.estimator, model.hift):
        assert not any(type(m) in (nn.Conv1d, nn.ConvTranspose1d, nn.Mish) for m in module.modules())
    assert any(isinstance(m, Int8Conv1d) for m in model.hift.modules()) == (mode == "fast")


def test_exact_mode_keeps_the_official_convolutions(exact):
    for module in (exact.flow, exact.hift):
        assert not any(isinstance(m, (TimeMajorConv1d, ExpMish)) for m in module.modules())


def test_default_mode_vocoder_matches_float32(exact):
    """HiFT in default mode is float32 with another memory layout: same waveform up to float rounding."""
    default = load_model(MODEL_DIR, mode="default")
    mel = torch.randn(1, 80, 60, generator=torch.Generator().manual_seed(0))
    ref, _ = exact.hift(mel, generator=torch.Generator().manual_seed(1))
    ours, _ = default.hift(mel, generator=torch.Generator().manual_seed(1))
    assert rel(ours, ref) < 1e-3
