"""Compare our implementation with outputs of the official CosyVoice code stored in a golden directory.

A golden directory holds ``model/`` (an official model directory), ``manifest.json`` (cases and their arrays),
one folder of ``.npy`` arrays per case and, optionally, ``frontend.json`` (see tests/golden/README.md for
the format). Every stage is fed the official inputs of that stage, so an error points at one component; the
``mel`` of a flow case and the ``e2e`` stages run the whole chain.

``scripts/check_parity.py GOLDEN_DIR`` prints one line per case and stage; the tests call ``run_checks``.
"""
from __future__ import annotations

import json
import math
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from cosyvoice_lite.decode.reference import generate, text_to_tokens

TOLERANCE = 1e-3
# frontend.json normaliser name -> our TextFrontend `normalize` flag
NORMALISERS = {"none": False, "wetext": True}


@dataclass
class Check:
    case: str
    stage: str
    error: float          # max-abs difference, or number of mismatching items for exact stages
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return not math.isnan(self.error) and self.error <= self.tolerance

    def line(self) -> str:
        status = "ok" if self.ok else ("ERROR" if math.isnan(self.error) else "FAIL")
        value = "n/a" if math.isnan(self.error) else (f"{self.error:.3g}" if self.tolerance else f"{int(self.error)}")
        kind = "max_abs" if self.tolerance else "mismatches"
        return f"{self.case:<14} {self.stage:<26} {kind}={value:<10} {status}" + (f"  {self.note}" if self.note else "")


def max_abs(ours: torch.Tensor, theirs: np.ndarray) -> float:
    theirs = torch.from_numpy(np.asarray(theirs))
    if tuple(ours.shape) != tuple(theirs.shape):
        raise ValueError(f"shape {tuple(ours.shape)} != official {tuple(theirs.shape)}")
    return (ours.detach().float() - theirs.float()).abs().max().item() if ours.numel() else 0.0


def mismatches(ours, theirs) -> float:
    ours, theirs = list(ours), list(theirs)
    return float(sum(a != b for a, b in zip(ours, theirs)) + abs(len(ours) - len(theirs)))


class Golden:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: not a golden directory")
        self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        self.cases = self.manifest.get("cases", {})

    def array(self, case: str, name: str) -> np.ndarray:
        return np.load(self.root / case / f"{name}.npy")

    def has(self, case: str, name: str) -> bool:
        return (self.root / case / f"{name}.npy").is_file()


# --- model stages ---------------------------------------------------------------------------------------------

def _llm_stages(model, golden: Golden, case: str) -> Iterator[tuple[str, Callable[[], float], float]]:
    llm = model.llm
    text = torch.from_numpy(golden.array(case, "text_token").astype(np.int64)).reshape(1, -1)  # (1, L)
    embedding = torch.from_numpy(golden.array(case, "embedding")).float()
    speech = torch.from_numpy(golden.array(case, "speech_token").astype(np.int64)).reshape(1, -1)  # (1, N)
    L, N = text.shape[1], speech.shape[1]

    def text_encoder_out():
        x = torch.from_numpy(golden.array(case, "text_embedding_out"))
        return max_abs(llm.text_encoder(x, torch.tensor([L]))[0], golden.array(case, "text_encoder_out"))

    def lm_input():
        ours = torch.cat([llm.prefix(text, embedding), llm.embed_tokens(speech[:, :-1])], dim=1)
        return max_abs(ours, golden.array(case, "lm_input"))

    def full_forward_logits():
        logits = llm.forward_logits(torch.from_numpy(golden.array(case, "lm_input")))
        return max_abs(logits[0, L + 2:L + 2 + N], golden.array(case, "full_forward_logits"))

    def step_logits():
        # teacher-forced through the KV cache: the prefix in one step, then one official token per step
        cache = llm.new_cache()
        rows = [llm.step(llm.prefix(text, embedding), cache)]
        for i in range(N - 1):
            rows.append(llm.step(llm.embed_tokens(speech[:, i:i + 1]), cache))
        return max_abs(torch.cat(rows), golden.array(case, "step_logits"))

    def speech_token():
        ratio = (N + 0.5) / L  # the official forcing: min_len = max_len = N
        torch.manual_seed(int(golden.cases[case].get("seed", 0)))
        ours = list(generate(llm, text, embedding, min_token_text_ratio=ratio, max_token_text_ratio=ratio))
        return mismatches(ours, speech[0].tolist())

    yield "text_embedding_out", lambda: max_abs(llm.text_embedding(text), golden.array(case, "text_embedding_out")), TOLERANCE
    yield "text_encoder_out", text_encoder_out, TOLERANCE
    yield "text_encoder_affine_out", lambda: max_abs(llm.encode_text(text), golden.array(case, "text_encoder_affine_out")), TOLERANCE
    yield "spk_embed_proj", lambda: max_abs(llm.embed_speaker(embedding)[:, 0], golden.array(case, "spk_embed_proj")), TOLERANCE
    yield "lm_input", lm_input, TOLERANCE
    yield "full_forward_logits", full_forward_logits, TOLERANCE
    yield "step_logits (kv cache)", step_logits, TOLERANCE
    yield "speech_token (seeded)", speech_token, 0.0


def _flow_hift_stages(model, golden: Golden, case: str) -> Iterator[tuple[str, Callable[[], float], float]]:
    flow, hift = model.flow, model.hift
    g = lambda name: golden.array(case, name)  # noqa: E731
    t = lambda name: torch.from_numpy(g(name))  # noqa: E731
    token = t("speech_token").long().reshape(1, -1)  # (1, T)
    embedding = t("embedding").float()

    def encoder_out():
        return max_abs(flow.encoder(t("encoder_in"), torch.tensor([token.shape[1]]))[0], g("encoder_out"))

    def mu():
        h = t("encoder_proj_out")
        n_frames = flow.n_frames(token.shape[1])
        return max_abs(flow.length_regulator.inference(h, n_frames, flow.input_frame_rate, flow.sample_rate,
                                                       flow.hop_size), g("mu"))

    def est_step1_out():
        out = flow.decoder.estimator(t("est_step1_x"), t("est_step1_mask"), t("est_step1_mu"), t("est_step1_t"),
                                     t("est_step1_spks"), t("est_step1_cond"))
        return max_abs(out, g("est_step1_out"))

    def x_after_step1():
        t_span = flow.decoder.t_span(10)[:2]
        x = flow.decoder.solve_euler(t("z"), t_span, t("mu"), t("mask"), t("spk_proj"), t("cond"))
        return max_abs(x, g("x_after_step1"))

    def mel():
        n_steps = int(golden.cases[case].get("n_timesteps", 10))
        return max_abs(flow.inference(token, embedding, n_timesteps=n_steps, noise=t("z")), g("mel"))

    yield "spk_proj", lambda: max_abs(flow.project_speaker(embedding), g("spk_proj")), TOLERANCE
    yield "encoder_in", lambda: max_abs(flow.input_embedding(token), g("encoder_in")), TOLERANCE
    yield "encoder_out", encoder_out, TOLERANCE
    yield "encoder_proj_out", lambda: max_abs(flow.encoder_proj(t("encoder_out")), g("encoder_proj_out")), TOLERANCE
    yield "mu (length regulator)", mu, TOLERANCE
    yield "t_span", lambda: max_abs(flow.decoder.t_span(len(g("t_span")) - 1), g("t_span")), TOLERANCE
    yield "est_step1_out", est_step1_out, TOLERANCE
    yield "x_after_step1", x_after_step1, TOLERANCE
    yield "mel (tokens+z -> mel)", mel, TOLERANCE
    yield "hift_f0", lambda: max_abs(hift.predict_f0(t("mel")), g("hift_f0")), TOLERANCE
    yield "wav (mel+source -> wav)", lambda: max_abs(hift.decode(t("mel"), t("hift_source")), g("wav")), TOLERANCE


def _e2e_stages(model, golden: Golden, case: str) -> Iterator[tuple[str, Callable[[], float], float]]:
    meta = golden.cases[case]
    text = golden.array(case, "text_token").astype(np.int64).tolist()
    official_tokens = golden.array(case, "speech_token").astype(np.int64).tolist()
    ratio = (len(official_tokens) + 0.5) / len(text)
    result = {}

    def run():
        # One seeded run in the official order of random draws: LLM sampling, flow noise, HiFT source.
        if not result:
            torch.manual_seed(int(meta.get("seed", 0)))
            result["tokens"] = list(text_to_tokens(model, text, meta["spk"], min_token_text_ratio=ratio,
                                                   max_token_text_ratio=ratio))
            result["mel"] = model.tokens_to_mel(result["tokens"], meta["spk"])
            result["wav"] = model.mel_to_wav(result["mel"])
        return result

    yield "speech_token (seeded)", lambda: mismatches(run()["tokens"], official_tokens), 0.0
    yield "mel (seeded)", lambda: max_abs(run()["mel"], golden.array(case, "mel")), TOLERANCE
    yield "wav (seeded)", lambda: max_abs(run()["wav"], golden.array(case, "wav")), TOLERANCE


STAGES = {"llm": _llm_stages, "flow+hift": _flow_hift_stages, "e2e_sft": _e2e_stages}


def model_checks(golden: Golden, model=None) -> Iterator[Check]:
    if model is None:
        from cosyvoice_lite.model import load_model
        try:
            model = load_model(golden.root / "model")
        except Exception as error:
            yield Check("model", "load_model", math.nan, TOLERANCE, f"{type(error).__name__}: {error}")
            return
    with torch.inference_mode():
        for case, meta in golden.cases.items():
            stages = STAGES.get(meta.get("kind"))
            if stages is None:
                yield Check(case, "kind", math.nan, 0.0, f"unknown case kind {meta.get('kind')!r}")
                continue
            try:
                for stage, compute, tolerance in stages(model, golden, case):
                    try:
                        yield Check(case, stage, float(compute()), tolerance)
                    except Exception as error:
                        yield Check(case, stage, math.nan, tolerance, f"{type(error).__name__}: {error}")
            except Exception as error:
                yield Check(case, "inputs", math.nan, 0.0, f"{type(error).__name__}: {error}")


# --- frontend -------------------------------------------------------------------------------------------------

def frontend_checks(golden: Golden, frontend=None) -> Iterator[Check]:
    path = golden.root / "frontend.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if frontend is None:
        from cosyvoice_lite.frontend import TextFrontend
        frontend = TextFrontend()
    for index, item in enumerate(data.get("items", [])):
        for normaliser, expected in item.items():
            if normaliser == "text" or not isinstance(expected, dict):
                continue
            case = f"frontend[{index}]"
            if expected.get("segments") is None:
                # The official frontend itself failed on this text; ours must still answer without crashing.
                try:
                    ours = frontend.normalize(item["text"], normalize=NORMALISERS.get(normaliser, True))
                    yield Check(case, f"{normaliser}: no crash", 0.0, 0.0, f"official failed; ours: {ours!r}")
                except Exception as error:
                    yield Check(case, f"{normaliser}: no crash", math.nan, 0.0, f"{type(error).__name__}: {error}")
                continue
            try:
                tokens = [frontend.tokenize(segment) for segment in expected["segments"]]
                yield Check(case, f"{normaliser}: token_ids", mismatches(tokens, expected["token_ids"]), 0.0)
                if normaliser not in NORMALISERS:
                    yield Check(case, f"{normaliser}: segments", math.nan, 0.0, "normaliser not implemented here")
                    continue
                flag = NORMALISERS[normaliser]
                text = frontend.normalize(item["text"], normalize=flag)
                yield Check(case, f"{normaliser}: normalized_text", float(text != expected["normalized_text"]), 0.0,
                            "" if text == expected["normalized_text"] else f"got {text!r}")
                segments = frontend.split(item["text"], normalize=flag)
                yield Check(case, f"{normaliser}: segments", mismatches(segments, expected["segments"]), 0.0)
            except Exception as error:
                yield Check(case, normaliser, math.nan, 0.0, f"{type(error).__name__}: {error}\n{traceback.format_exc()}")


def run_checks(golden_dir: str | Path, parts: tuple[str, ...] = ("model", "frontend")) -> list[Check]:
    golden = Golden(golden_dir)
    checks: list[Check] = []
    if "model" in parts:
        checks += model_checks(golden)
    if "frontend" in parts:
        checks += frontend_checks(golden)
    return checks
