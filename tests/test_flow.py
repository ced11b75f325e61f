"""Parity of the flow (tokens -> mel) with the official CosyVoice v1 outputs stored in the golden set."""

import numpy as np
import pytest
import torch
from golden_data import GOLDEN

from cosyvoice_lite.model.config import read_config
from cosyvoice_lite.model.flow import EDGE_TOKENS
from cosyvoice_lite.model.loader import build, load_state
from cosyvoice_lite.model.transformer import split_qkv_keys
from parity import Golden

MODEL_DIR = GOLDEN / "model"
TOL = 1e-3


MANIFEST = Golden(GOLDEN).manifest  # raises with the path when the golden data is missing
CASES = sorted(name for name, case in MANIFEST["cases"].items() if case.get("kind") == "flow+hift")


def load(case, name):
    path = GOLDEN / case / f"{name}.npy"
    assert path.is_file(), f"golden array missing: {path}"
    return torch.from_numpy(np.load(path))


def meta(case):
    return MANIFEST["cases"][case]


def max_abs(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ---- the flow built by the loader's code path (flow section only, so other stages cannot break these tests) --------

def official_state():
    return torch.load(MODEL_DIR / "flow.pt", map_location="cpu")


@pytest.fixture(scope="module")
def flow():
    module = build(read_config(MODEL_DIR / "cosyvoice.yaml")["flow"], "flow")
    load_state(module, official_state(), "flow.pt")  # strict
    return module.eval()


@pytest.fixture(scope="module")
def cfm(flow):
    return flow.decoder


class EstimatorCalls:
    """Records the inputs of every estimator call (the solver reuses its buffers, so they are cloned)."""

    def __init__(self, estimator):
        self.calls = []
        self.handle = estimator.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls.append([a.clone() for a in args])

    def close(self):
        self.handle.remove()


_SOLVED = {}


def run_solver(cfm, case):
    """Euler solve from the golden mu / spk_proj / z; returns (mel, recorded estimator inputs). Cached per case."""
    key = (id(cfm), case)
    if key not in _SOLVED:
        mu, spks, z = load(case, "mu"), load(case, "spk_proj"), load(case, "z")
        t_span = cfm.t_span(meta(case)["n_timesteps"])
        rec = EstimatorCalls(cfm.estimator)
        try:
            with torch.inference_mode():
                mel = cfm.solve_euler(z, t_span, mu, load(case, "mask"), spks, load(case, "cond"))
        finally:
            rec.close()
        _SOLVED[key] = (mel, rec.calls)
    return _SOLVED[key]


# ---- pieces from the golden intermediate arrays -------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_estimator_step1(cfm, case):
    names = ["x", "mask", "mu", "t", "spks", "cond"]
    with torch.inference_mode():
        out = cfm.estimator(*[load(case, f"est_step1_{n}") for n in names])
    assert max_abs(out, load(case, "est_step1_out")) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_length_regulator(flow, case):
    h = load(case, "encoder_proj_out")
    mu_ref = load(case, "mu")
    with torch.inference_mode():
        mu = flow.length_regulator.inference(h, mu_ref.shape[2], flow.input_frame_rate, flow.sample_rate,
                                             flow.hop_size)
    assert max_abs(mu, mu_ref) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_t_span(cfm, case):
    t_span = cfm.t_span(meta(case)["n_timesteps"])
    assert max_abs(t_span, load(case, "t_span")) == 0.0


@pytest.mark.parametrize("case", CASES)
def test_euler_t_fed_to_estimator(cfm, case):
    _, calls = run_solver(cfm, case)
    euler_t = load(case, "euler_t")
    assert len(calls) == len(euler_t)
    fed = torch.stack([call[3][0] for call in calls])
    assert max_abs(fed, euler_t) == 0.0
    assert all(torch.equal(call[3][0], call[3][1]) for call in calls)


@pytest.mark.parametrize("case", CASES)
def test_cfg_batch_layout_step1(cfm, case):
    _, calls = run_solver(cfm, case)
    for got, name in zip(calls[0], ["x", "mask", "mu", "t", "spks", "cond"]):
        assert max_abs(got, load(case, f"est_step1_{name}")) == 0.0, name


@pytest.mark.parametrize("case", CASES)
def test_x_after_step1(cfm, case):
    _, calls = run_solver(cfm, case)
    assert max_abs(calls[1][0][:1], load(case, "x_after_step1")) <= TOL


@pytest.mark.parametrize("case", [c for c in CASES if (GOLDEN / c / "x_steps.npy").is_file()])
def test_x_steps(cfm, case):
    mel, calls = run_solver(cfm, case)
    steps = torch.cat([call[0][:1] for call in calls[1:]] + [mel])  # x after update k = estimator input at k+1
    assert max_abs(steps, load(case, "x_steps")) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_mel_from_golden_mu_and_z(cfm, case):
    mel, _ = run_solver(cfm, case)
    assert max_abs(mel, load(case, "mel")) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_cfm_forward_seeded_draws_z_and_caches_overlap(flow, case):
    cfm, overlap = flow.decoder, flow.n_frames(EDGE_TOKENS)  # mel frames of the 20-token streaming overlap
    mu, z = load(case, "mu"), load(case, "z")
    torch.manual_seed(meta(case)["seed"])
    mel, cache = cfm(mu, load(case, "mask"), meta(case)["n_timesteps"], spks=load(case, "spk_proj"),
                     cond=load(case, "cond"))
    assert max_abs(mel, load(case, "mel")) <= TOL
    assert torch.equal(cache, torch.stack([z[:, :, -overlap:], mu[:, :, -overlap:]], dim=-1))


# ---- the whole flow ------------------------------------------------------------------------------------------------

def test_flow_state_dict_is_the_official_layout_once_qkv_is_split(flow):
    assert set(split_qkv_keys(flow, flow.state_dict())) == set(official_state())


@pytest.mark.parametrize("case", CASES)
def test_mel_frame_count(flow, case):
    T = load(case, "speech_token").shape[1]
    assert flow.n_frames(T) == meta(case)["n_frames"] == load(case, "mel").shape[2]


@pytest.mark.parametrize("case", CASES)
def test_spk_proj(flow, case):
    with torch.inference_mode():
        spks = flow.project_speaker(load(case, "embedding"))
    assert max_abs(spks, load(case, "spk_proj")) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_encoder_in(flow, case):
    with torch.inference_mode():
        x = flow.input_embedding(load(case, "speech_token").long())
    assert max_abs(x, load(case, "encoder_in")) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_encoder_out_from_golden_input(flow, case):
    x = load(case, "encoder_in")
    with torch.inference_mode():
        h, _ = flow.encoder(x, torch.tensor([x.shape[1]], dtype=torch.int32))
    assert max_abs(h, load(case, "encoder_out")) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_encoder_proj_out(flow, case):
    with torch.inference_mode():
        h = flow.encoder_proj(load(case, "encoder_out"))
    assert max_abs(h, load(case, "encoder_proj_out")) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_encode_tokens_to_mu(flow, case):
    with torch.inference_mode():
        mu = flow.encode(load(case, "speech_token"))
    assert max_abs(mu, load(case, "mu")) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_inference_with_given_noise(flow, case):
    mel = flow.inference(load(case, "speech_token"), load(case, "embedding"), n_timesteps=meta(case)["n_timesteps"],
                         noise=load(case, "z"))
    assert max_abs(mel, load(case, "mel")) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_seeded_inference_draws_official_noise(flow, case):
    drawn = []
    hook = flow.decoder.estimator.register_forward_pre_hook(
        lambda m, args: drawn.append(args[0][:1].clone()) if not drawn else None)
    try:
        torch.manual_seed(meta(case)["seed"])
        mel = flow.inference(load(case, "speech_token"), load(case, "embedding"),
                             n_timesteps=meta(case)["n_timesteps"])
    finally:
        hook.remove()
    assert torch.equal(drawn[0], load(case, "z"))
    assert max_abs(mel, load(case, "mel")) <= TOL
