"""ESPnet-style encoders: golden flow encoder stage, masking rules, incremental decoding, config guards."""
import math

import numpy as np
import pytest
import torch
from golden_data import GOLDEN

from cosyvoice_lite.model.config import read_config
from cosyvoice_lite.model.loader import build, load_state
from cosyvoice_lite.model.transformer import ConformerEncoder, EspnetRelPositionalEncoding, TransformerEncoder
from parity import Golden

TOL = 1e-3


MANIFEST = Golden(GOLDEN).manifest  # raises with the path when the golden data is missing
FLOW_CASES = [name for name, case in MANIFEST["cases"].items()
              if "encoder_in.npy" in case["files"] and "encoder_out.npy" in case["files"]]
assert FLOW_CASES, "manifest lists no flow encoder cases"


def _sub_state(path, prefix):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def config():
    return read_config(GOLDEN / "model" / "cosyvoice.yaml")


@pytest.fixture(scope="module")
def flow_encoder(config):
    encoder = build(config["flow"].kwargs["encoder"], "flow.encoder")
    load_state(encoder, _sub_state(GOLDEN / "model" / "flow.pt", "encoder."), "flow.pt")
    return encoder.eval()


@pytest.fixture(scope="module")
def text_encoder(config):
    encoder = build(config["llm"].kwargs["text_encoder"], "llm.text_encoder")
    load_state(encoder, _sub_state(GOLDEN / "model" / "llm.pt", "text_encoder."), "llm.pt")
    return encoder.eval()


@pytest.fixture(scope="module")
def lm(config):
    encoder = build(config["llm"].kwargs["llm"], "llm.llm")
    load_state(encoder, _sub_state(GOLDEN / "model" / "llm.pt", "llm."), "llm.pt")
    return encoder.eval()


@pytest.mark.parametrize("case", FLOW_CASES)
def test_flow_encoder_full_attention_matches_golden(flow_encoder, case):
    x = torch.from_numpy(np.load(GOLDEN / case / "encoder_in.npy"))
    golden = np.load(GOLDEN / case / "encoder_out.npy")
    with torch.inference_mode():
        out, mask = flow_encoder(x, torch.tensor([x.size(1)]))
    assert out.shape == golden.shape and mask.shape == (1, 1, x.size(1)) and mask.all()
    assert float(np.abs(out.numpy() - golden).max()) <= TOL


def test_flow_encoder_attends_to_the_future(flow_encoder):
    x = torch.randn(1, 12, flow_encoder.embed.out[0].in_features, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, -1] += 1.0
    with torch.inference_mode():
        a, _ = flow_encoder(x)
        b, _ = flow_encoder(y)
    assert float((a[:, 0] - b[:, 0]).abs().max()) > 1e-4


def test_static_chunk_one_is_causal(text_encoder):
    x = torch.randn(1, 12, text_encoder.embed.out[0].in_features, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 7:] += 1.0
    with torch.inference_mode():
        a, _ = text_encoder(x)
        b, _ = text_encoder(y)
    assert torch.equal(a[:, :7], b[:, :7])
    assert float((a[:, 7:] - b[:, 7:]).abs().max()) > 1e-4


def test_static_chunk_two_sees_its_chunk():
    torch.manual_seed(0)
    enc = ConformerEncoder(8, output_size=16, attention_heads=2, linear_units=32, num_blocks=1, input_layer="linear",
                           pos_enc_layer_type="rel_pos_espnet", static_chunk_size=2, macaron_style=False,
                           use_cnn_module=False).eval()
    x = torch.randn(1, 6, 8)
    y = x.clone()
    y[:, 3] += 1.0  # frame 3 is in chunk [2, 3]
    with torch.inference_mode():
        a, _ = enc(x)
        b, _ = enc(y)
    assert torch.equal(a[:, :2], b[:, :2])
    assert float((a[:, 2] - b[:, 2]).abs().max()) > 1e-5  # frame 2 sees frame 3


def test_padding_does_not_change_valid_frames(flow_encoder):
    gen = torch.Generator().manual_seed(1)
    d = flow_encoder.embed.out[0].in_features
    short, long = torch.randn(1, 7, d, generator=gen), torch.randn(1, 11, d, generator=gen)
    batch = torch.zeros(2, 11, d)
    batch[0, :7], batch[1] = short[0], long[0]
    with torch.inference_mode():
        out, mask = flow_encoder(batch, torch.tensor([7, 11]))
        alone, _ = flow_encoder(short, torch.tensor([7]))
    assert mask[0, 0].tolist() == [True] * 7 + [False] * 4
    assert float((out[0, :7] - alone[0]).abs().max()) <= 1e-5


def test_kv_cache_steps_equal_full_causal_forward(lm):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 20, lm.embed.out[0].in_features, generator=gen)
    with torch.inference_mode():
        full, _ = lm(x)
        cache = lm.new_cache()
        parts = [lm.forward_chunk(x[:, :5], cache)]  # a prefix, then one frame at a time
        parts += [lm.forward_chunk(x[:, i:i + 1], cache) for i in range(5, 20)]
    assert cache.offset == 20
    assert float((torch.cat(parts, 1) - full).abs().max()) <= 1e-5


def test_kv_cache_multi_frame_chunks_equal_full_causal_forward(lm):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 17, lm.embed.out[0].in_features, generator=gen)
    with torch.inference_mode():
        full, _ = lm(x)
        cache = lm.new_cache()
        parts = [lm.forward_chunk(x[:, a:b], cache) for a, b in ((0, 4), (4, 5), (5, 11), (11, 12), (12, 17))]
    assert float((torch.cat(parts, 1) - full).abs().max()) <= 1e-5


def test_kv_cache_grows_past_initial_capacity(lm):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 150, lm.embed.out[0].in_features, generator=gen)
    with torch.inference_mode():
        full, _ = lm(x)
        cache = lm.new_cache()
        parts = [lm.forward_chunk(x[:, :3], cache)] + [lm.forward_chunk(x[:, i:i + 1], cache) for i in range(3, 150)]
    assert float((torch.cat(parts, 1) - full).abs().max()) <= 1e-5


def test_full_attention_forward_chunk_equals_forward(flow_encoder):
    x = torch.randn(1, 9, flow_encoder.embed.out[0].in_features, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        full, _ = flow_encoder(x)
        chunk = flow_encoder.forward_chunk(x, flow_encoder.new_cache())
    assert float((chunk - full).abs().max()) <= 1e-6


def test_relative_position_table_layout_and_growth():
    pe = EspnetRelPositionalEncoding(8)
    like = torch.zeros(1)
    base = pe.rows(4999, -4999, like)  # the official precomputed range
    assert base.shape == (1, 9999, 8)
    rows = pe.rows(3, -2, like)[0]  # relative positions 3, 2, 1, 0, -1, -2
    inv_freq = torch.exp(torch.arange(0, 8, 2, dtype=torch.float32) * -(math.log(10000.0) / 8))
    for row, rel in zip(rows, (3, 2, 1, 0, -1, -2)):
        angle = torch.tensor(float(rel)) * inv_freq
        assert torch.allclose(row[0::2], torch.sin(angle), atol=1e-6)
        assert torch.allclose(row[1::2], torch.cos(angle), atol=1e-6)
    far = pe.rows(7000, -7000, like)  # beyond 5000 positions: table grows instead of failing
    assert far.shape == (1, 14001, 8)
    assert torch.allclose(far[0, 7000 - 4999:7000 + 5000], base[0], atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(use_cnn_module=True, macaron_style=False), "use_cnn_module"),
    (dict(use_cnn_module=False, macaron_style=True), "macaron_style"),
    (dict(use_cnn_module=False, macaron_style=False, input_layer="conv2d"), "input_layer"),
    (dict(use_cnn_module=False, macaron_style=False, pos_enc_layer_type="rel_pos"), "pos_enc_layer_type"),
])
def test_unsupported_conformer_options_raise(kwargs, message):
    base = dict(input_size=8, output_size=16, attention_heads=2, linear_units=32, num_blocks=1,
                input_layer="linear", pos_enc_layer_type="rel_pos_espnet")
    with pytest.raises(NotImplementedError, match=message):
        ConformerEncoder(**{**base, **kwargs})


def test_transformer_encoder_rejects_plain_attention():
    with pytest.raises(NotImplementedError, match="selfattention_layer_type"):
        TransformerEncoder(8, output_size=16, input_layer="linear_legacy", pos_enc_layer_type="rel_pos_espnet",
                           selfattention_layer_type="selfattn")
