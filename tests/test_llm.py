"""TransformerLM parity with the official CosyVoice v1 LLM (golden cases of kind 'llm' and 'e2e_sft')."""
import copy

import numpy as np
import pytest
import torch
from golden_data import GOLDEN

from cosyvoice_lite.decode.reference import generate
from cosyvoice_lite.model.config import read_config
from cosyvoice_lite.model.llm import TransformerLM, nucleus_sampling, ras_sampling, token_limit
from cosyvoice_lite.model.loader import build, load_state
from parity import Golden

TOL = 1e-3


MANIFEST = Golden(GOLDEN).manifest  # raises with the path when the golden data is missing
LLM_CASES = [name for name, case in MANIFEST["cases"].items() if case.get("kind") == "llm"]
E2E_CASES = [name for name, case in MANIFEST["cases"].items() if case.get("kind") == "e2e_sft"]
assert LLM_CASES, "manifest lists no 'llm' cases"


@pytest.fixture(scope="module")
def llm() -> TransformerLM:
    config = read_config(GOLDEN / "model" / "cosyvoice.yaml")
    model = build(config["llm"], "llm")
    load_state(model, torch.load(GOLDEN / "model" / "llm.pt", map_location="cpu", weights_only=True), "llm.pt")
    return model.eval()


def load(case, name):
    return np.load(GOLDEN / case / name)


def text_token(case):
    return torch.from_numpy(load(case, "text_token.npy").astype(np.int64))[None]  # (1, L)


def embedding(case):
    return torch.from_numpy(load(case, "embedding.npy"))  # (1, 192)


def maxabs(ours: torch.Tensor, golden: np.ndarray) -> float:
    assert tuple(ours.shape) == golden.shape, (tuple(ours.shape), golden.shape)
    return float(np.abs(ours.detach().numpy().astype(np.float64) - golden).max())


def forcing_ratio(n: int, text_len: int) -> float:
    """The official kwargs used to force exactly n tokens: min = max = (n + 0.5) / L."""
    return (n + 0.5) / text_len


@pytest.mark.parametrize("case", LLM_CASES)
def test_text_embedding(llm, case):
    with torch.inference_mode():
        out = llm.text_embedding(text_token(case))
    assert maxabs(out, load(case, "text_embedding_out.npy")) == 0.0


@pytest.mark.parametrize("case", LLM_CASES)
def test_text_encoder_is_causal_conformer_output(llm, case):
    x = torch.from_numpy(load(case, "text_embedding_out.npy"))
    with torch.inference_mode():
        out, mask = llm.text_encoder(x, torch.tensor([x.size(1)]))
    assert mask.all()
    assert maxabs(out, load(case, "text_encoder_out.npy")) <= TOL


@pytest.mark.parametrize("case", LLM_CASES)
def test_encode_text_affine_output(llm, case):
    with torch.inference_mode():
        out = llm.encode_text(text_token(case))
    assert maxabs(out, load(case, "text_encoder_affine_out.npy")) <= TOL


@pytest.mark.parametrize("case", LLM_CASES)
def test_speaker_projection(llm, case):
    with torch.inference_mode():
        out = llm.embed_speaker(embedding(case))[:, 0]  # (1, D)
    assert maxabs(out, load(case, "spk_embed_proj.npy")) <= TOL


@pytest.mark.parametrize("case", LLM_CASES)
def test_teacher_forced_lm_input(llm, case):
    tokens = torch.from_numpy(load(case, "speech_token.npy").astype(np.int64))[None]  # (1, N)
    with torch.inference_mode():
        lm_input = torch.cat([llm.prefix(text_token(case), embedding(case)), llm.embed_tokens(tokens[:, :-1])], 1)
    assert maxabs(lm_input, load(case, "lm_input.npy")) <= TOL


@pytest.mark.parametrize("case", LLM_CASES)
def test_full_forward_logits_from_golden_lm_input(llm, case):
    lm_input = torch.from_numpy(load(case, "lm_input.npy"))
    golden = load(case, "full_forward_logits.npy")  # (N, V+1) at positions L+2 .. L+1+N
    L, N = text_token(case).size(1), golden.shape[0]
    with torch.inference_mode():
        logits = llm.forward_logits(lm_input)[0, L + 2:L + 2 + N]
    assert maxabs(logits, golden) <= TOL


@pytest.mark.parametrize("case", LLM_CASES)
def test_full_forward_logits_from_own_prefix(llm, case):
    tokens = torch.from_numpy(load(case, "speech_token.npy").astype(np.int64))[None]
    golden = load(case, "full_forward_logits.npy")
    L, N = text_token(case).size(1), golden.shape[0]
    with torch.inference_mode():
        lm_input = torch.cat([llm.prefix(text_token(case), embedding(case)), llm.embed_tokens(tokens[:, :-1])], 1)
        logits = llm.forward_logits(lm_input)[0, L + 2:L + 2 + N]
    assert maxabs(logits, golden) <= TOL


def teacher_forced_step_logits(llm, case):
    """Decode with the KV cache, feeding the golden tokens: prefix first, then one token per step."""
    tokens = load(case, "speech_token.npy").astype(np.int64)
    cache = llm.new_cache()
    rows = []
    with torch.inference_mode():
        x = llm.prefix(text_token(case), embedding(case))
        for token in tokens:
            rows.append(llm.step(x, cache))
            x = llm.speech_embedding.weight[int(token)].reshape(1, 1, -1)
    return torch.cat(rows), cache


@pytest.mark.parametrize("case", LLM_CASES)
def test_step_logits_with_kv_cache(llm, case):
    logits, cache = teacher_forced_step_logits(llm, case)
    N, L = logits.size(0), text_token(case).size(1)
    assert cache.offset == L + 3 + N - 1  # every input row went through the LM exactly once
    assert maxabs(logits, load(case, "step_logits.npy")) <= TOL


@pytest.mark.parametrize("case", LLM_CASES)
def test_kv_cache_path_equals_full_forward(llm, case):
    logits, _ = teacher_forced_step_logits(llm, case)
    lm_input = torch.from_numpy(load(case, "lm_input.npy"))
    L, N = text_token(case).size(1), logits.size(0)
    with torch.inference_mode():
        full = llm.forward_logits(lm_input)[0, L + 2:L + 2 + N]
    assert float((logits - full).abs().max()) <= 1e-4


@pytest.mark.parametrize("case", LLM_CASES)
def test_seeded_generation_reproduces_official_tokens(llm, case):
    meta = MANIFEST["cases"][case]
    golden = load(case, "speech_token.npy").tolist()
    assert len(golden) == meta["force_n"]
    ratio = forcing_ratio(len(golden), text_token(case).size(1))
    seen = []
    torch.manual_seed(meta["seed"])
    tokens = list(generate(llm, text_token(case), embedding(case), min_token_text_ratio=ratio,
                               max_token_text_ratio=ratio, on_logits=lambda i, logits: seen.append(logits.clone())))
    assert tokens == golden
    # the logits the sampler saw are the golden per-step logits
    assert maxabs(torch.cat(seen), load(case, "step_logits.npy")) <= TOL


@pytest.mark.parametrize("case", E2E_CASES)
def test_e2e_sft_speech_tokens(llm, case):
    meta = MANIFEST["cases"][case]
    speakers = torch.load(GOLDEN / "model" / "spk2info.pt", map_location="cpu", weights_only=True)
    golden = load(case, "speech_token.npy").tolist()
    assert len(golden) == meta["force_n"]
    ratio = forcing_ratio(len(golden), text_token(case).size(1))
    torch.manual_seed(meta["seed"])  # the LLM is the first RNG consumer of inference_sft
    tokens = list(generate(llm, text_token(case), speakers[meta["spk"]]["embedding"],
                               min_token_text_ratio=ratio, max_token_text_ratio=ratio))
    assert tokens == golden


def test_generate_yields_ints_lazily(llm):
    case = LLM_CASES[0]
    stream = generate(llm, text_token(case), embedding(case))
    first = next(stream)
    assert isinstance(first, int) and 0 <= first < llm.speech_token_size
    stream.close()


def _with_eos_bias(llm, bias):
    model = copy.deepcopy(llm)
    with torch.no_grad():
        model.llm_decoder.bias[model.eos_token] += bias
    return model


def test_eos_is_never_sampled_before_min_len(llm):
    """With EOS overwhelmingly likely, decoding still emits exactly min_len tokens, then stops at EOS."""
    model = _with_eos_bias(llm, 1000.0)
    case = LLM_CASES[0]
    L = text_token(case).size(1)
    min_ratio = 7.5 / L  # min_len 7
    torch.manual_seed(0)
    tokens = list(generate(model, text_token(case), embedding(case), min_token_text_ratio=min_ratio,
                            max_token_text_ratio=20))
    assert len(tokens) == token_limit(L, min_ratio) == 7
    assert model.eos_token not in tokens


def test_max_len_caps_decoding(llm):
    model = _with_eos_bias(llm, -1000.0)  # EOS never drawn
    case = LLM_CASES[0]
    L = text_token(case).size(1)
    torch.manual_seed(0)
    tokens = list(generate(model, text_token(case), embedding(case), min_token_text_ratio=0,
                            max_token_text_ratio=12.5 / L))
    assert len(tokens) == 12


def test_token_limit_truncates_float32_product():
    assert token_limit(33, 40.5 / 33) == 40
    assert token_limit(16, 2) == 32
    assert token_limit(16, 20) == 320


def _nucleus_reference(scores, top_p, top_k):
    """Literal formulation: walk the stable descending sort, keep tokens while mass-so-far < top_p and
    fewer than top_k are kept (mass accumulated in float32), then draw one with multinomial."""
    values, ids = scores.softmax(dim=0).sort(descending=True, stable=True)
    kept, kept_ids, mass = [], [], torch.tensor(0.0)
    for value, idx in zip(values, ids):
        if mass < top_p and len(kept) < top_k:
            mass = mass + value
            kept.append(value)
            kept_ids.append(idx)
        else:
            break
    return int(torch.stack(kept_ids)[torch.stack(kept).multinomial(1, replacement=True)].item())


@pytest.mark.parametrize("seed", range(6))
def test_nucleus_sampling_equals_reference_with_same_rng_use(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(4097, generator=gen) * (1 + seed)
    if seed % 2:
        scores = (scores * 2).round() / 2  # many exact ties
    for top_p, top_k in ((0.8, 25), (0.5, 10), (0.99, 3), (1.0, 4097)):
        torch.manual_seed(100 + seed)
        ours = nucleus_sampling(scores.log_softmax(0), top_p, top_k)
        after_ours = torch.rand(1)
        torch.manual_seed(100 + seed)
        ref = _nucleus_reference(scores.log_softmax(0), top_p, top_k)
        after_ref = torch.rand(1)
        assert ours == ref
        assert torch.equal(after_ours, after_ref)  # same number of random draws


def test_ras_sampling_bans_a_repeated_pick():
    scores = torch.full((50,), -40.0)
    scores[5] = 0.0  # nucleus always picks 5
    logp = scores.log_softmax(0)
    torch.manual_seed(0)
    assert ras_sampling(logp.clone(), [1, 2, 3], top_p=0.8, top_k=25, win_size=10, tau_r=0.1) == 5
    torch.manual_seed(0)
    fallback = logp.clone()
    assert ras_sampling(fallback, [5, 2, 3], top_p=0.8, top_k=25, win_size=10, tau_r=0.1) != 5
    assert fallback[5] == -float("inf")  # banned in place, as the official does
    torch.manual_seed(0)
    # a repeat outside the last win_size tokens does not count
    assert ras_sampling(logp.clone(), [5] + [1] * 10, top_p=0.8, top_k=25, win_size=10, tau_r=0.1) == 5
