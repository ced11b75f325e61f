"""The flow/HiFT layers of the non-exact speed modes (layers.TimeMajorConv1d, layers.Int8Conv1d, layers.ExpMish):
same functions as the float32 modules they stand for, in any input layout, loaded from those modules' checkpoint
keys. Speed is never asserted (scripts/bench.py measures it)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from golden_data import GOLDEN_MODEL

from cosyvoice_lite.model import load_model
from cosyvoice_lite.model.layers import ExpMish, Int8Conv1d, TimeMajorConv1d

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


def time_major_twin(conv):
    """A TimeMajorConv1d of the same sizes as ``conv``, loaded from its state dict (the official keys)."""
    transposed = isinstance(conv, nn.ConvTranspose1d)
    twin = TimeMajorConv1d(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                           conv.dilation[0], conv.groups, conv.bias is not None, transposed=transposed,
                           output_padding=conv.output_padding[0] if transposed else 0)
    twin.load_state_dict(conv.state_dict())
    return twin


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: repr(c))
@pytest.mark.parametrize("layout", ["contiguous", "time-major"])
def test_time_major_conv_computes_the_same_convolution(conv, layout):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 37)
    with torch.no_grad():
        ref = conv(x)
        ours = time_major_twin(conv)(time_major(x) if layout == "time-major" else x)
    assert ours.shape == ref.shape
    assert ours.stride(1) == 1  # output memory is time-major
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_int8_conv_is_close_to_the_float32_convolution():
    torch.manual_seed(0)
    conv = nn.Conv1d(16, 16, 7, dilation=3, padding=9)
    int8 = Int8Conv1d(16, 16, 7, dilation=3, padding=9)
    int8.load_state_dict(conv.state_dict())
    x = torch.randn(1, 16, 50)
    with torch.no_grad():
        assert rel(int8(x), conv(x)) < 5e-2  # 8-bit weights, 7-bit activations


@pytest.mark.parametrize("make", [lambda: TimeMajorConv1d(4, 8, 3), lambda: Int8Conv1d(4, 8, 3)],
                         ids=["time-major", "int8"])
def test_converted_convs_load_only_the_official_keys_and_shapes(make):
    state = nn.Conv1d(4, 8, 3).state_dict()
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"bias\""):
        make().load_state_dict({"weight": state["weight"]})
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"scale\""):
        make().load_state_dict({**state, "scale": torch.ones(1)})
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: copying a param with shape \(8, 4, 5\)"):
        make().load_state_dict({**state, "weight": torch.zeros(8, 4, 5)})


def test_exp_mish_is_mish_without_overflow():
    x = torch.cat([torch.linspace(-30, 30, 10001), torch.tensor([-1e4, -100.0, 19.9, 20.0, 20.1, 100.0, 1e4])])
    ours = ExpMish()(x)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, F.mish(x), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def exact():
    return load_model(MODEL_DIR)


@pytest.mark.parametrize("mode", ["default", "fast"])
def test_non_exact_modes_run_flow_and_hift_convolutions_time_major(mode):
    model = load_model(MODEL_DIR, mode=mode)
    for module in (model.flow.decoder.estimator, model.hift):
        assert not any(type(m) in (nn.Conv1d, nn.ConvTranspose1d, nn.Mish) for m in module.modules())
    assert not any(type(m) is nn.Mish for m in model.flow.modules())  # the length regulator's too
    int8 = [name for name, m in model.hift.named_modules() if isinstance(m, Int8Conv1d)]
    if mode == "fast":  # the residual blocks only
        assert int8 and all(name.startswith(("resblocks.", "source_resblocks.")) for name in int8)
        assert isinstance(model.hift.source_resblocks[0].convs1[0], Int8Conv1d)
    else:
        assert not int8


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
