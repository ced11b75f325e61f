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


# --- prompt-based modes (golden-modes sets: tests/golden-modes/README.md) ------------------------------------------
# A case of kind zero_shot / cross_lingual / instruct / zero_shot_spk / vc stores the official model input, the
# LLM's prefix and first logits, the flow's stages and the seeded end-to-end output; a frontend_audio case the
# features of one reference clip. The ONNX stand-ins sit in the set's model directory.

FEATURE_TOLERANCE = 1e-4   # log-mel / fbank / prompt mel (log domain) and resampled audio
EMBEDDING_TOLERANCE = 1e-5
WAV_TOLERANCE = 1e-4


def _voice_frontend(golden: Golden):
    if "voice_frontend" not in golden.__dict__:
        from cosyvoice_lite.frontend.onnx_models import VoiceFrontend
        golden.voice_frontend = VoiceFrontend(golden.root / "model")
    return golden.voice_frontend


def _text_frontend(golden: Golden):
    if "text_frontend" not in golden.__dict__:
        from cosyvoice_lite.frontend import TextFrontend
        golden.text_frontend = TextFrontend()
    return golden.text_frontend


def _clip(golden: Golden, relative: str):
    from cosyvoice_lite.frontend.prompt_audio import load_clip
    return load_clip((golden.root / relative).read_bytes())


def _frontend_audio_stages(model, golden: Golden, case: str):
    from cosyvoice_lite.frontend.prompt_audio import prompt_mel, speaker_fbank, whisper_log_mel
    meta, g = golden.cases[case], lambda name: golden.array(case, name)  # noqa: E731
    frontend = _voice_frontend(golden)
    clip = _clip(golden, meta["wav"])
    rate = int(golden.manifest.get("sample_rate", 22050))
    for name, target in (("speech_16k", 16000), ("speech_22050", rate)):
        if golden.has(case, name):  # not stored when the file already is mono at that rate
            yield f"{name} (resampled)", lambda n=name, r=target: max_abs(clip.at(r), g(n)), FEATURE_TOLERANCE
    yield "whisper_logmel", lambda: max_abs(whisper_log_mel(clip.at(16000)), g("whisper_logmel")), FEATURE_TOLERANCE
    yield "fbank", lambda: max_abs(speaker_fbank(clip.at(16000)), g("fbank")), FEATURE_TOLERANCE
    yield "speech_feat (prompt mel)", lambda: max_abs(prompt_mel(clip.at(rate), sample_rate=rate),
                                                      g("speech_feat")), FEATURE_TOLERANCE
    yield "speech_token (stored log-mel)", lambda: mismatches(frontend.tokenizer(g("whisper_logmel")),
                                                              g("speech_token").reshape(-1)), 0.0
    yield "embedding (stored fbank)", lambda: max_abs(torch.from_numpy(frontend.speaker_encoder(g("fbank"))),
                                                      g("embedding")), EMBEDDING_TOLERANCE


def _mode_voice(golden: Golden, case: str):
    """The Voice the official model input of a case amounts to (stored arrays, no frontend)."""
    from cosyvoice_lite.voices import BUILTIN, CLONED, Voice
    meta = golden.cases[case]
    a = lambda name: golden.array(case, name) if golden.has(case, name) else None  # noqa: E731
    if meta["kind"] == "instruct":
        speaker = a("flow_embedding")
        return Voice("golden", "golden", kind=BUILTIN, llm_embedding=speaker, flow_embedding=speaker).instructed(
            a("prompt_text").reshape(-1))
    prompt_mel = a("prompt_speech_feat")
    return Voice("golden", "golden", kind=CLONED, llm_embedding=a("llm_embedding"), flow_embedding=a("flow_embedding"),
                 prompt_text=[] if a("prompt_text") is None else a("prompt_text"),
                 prompt_speech=a("flow_prompt_speech_token"), prompt_mel=None if prompt_mel is None else prompt_mel[0])


def _model_input_stages(golden: Golden, case: str):
    """Our frontend from the prompt wavs against the stored model input (tokens via the stored log-mel)."""
    from cosyvoice_lite.frontend.prompt_audio import prompt_mel, speaker_fbank, whisper_log_mel
    meta = golden.cases[case]
    frontend = _voice_frontend(golden)
    rate = int(golden.manifest.get("sample_rate", 22050))
    def log_mel(fe_case, wav):
        # the tokenizer is an argmax hash: fed the stored log-mel where the set has it (ours is compared there)
        if fe_case and golden.has(fe_case, "whisper_logmel"):
            return golden.array(fe_case, "whisper_logmel")
        return whisper_log_mel(_clip(golden, wav).at(16000)).numpy()

    texts = [("text", meta.get("segment"))]
    if meta["kind"] != "cross_lingual":
        texts.append(("prompt_text", meta.get("prompt_text_normalized", meta.get("instruct_text_normalized"))))
    for name, text in texts:
        if text is not None and golden.has(case, name):
            yield f"model input: {name} tokens", lambda n=name, x=text: mismatches(
                _text_frontend(golden).tokenize(x), golden.array(case, n).reshape(-1)), 0.0
    if "prompt_wav" in meta:
        clip = lambda: _clip(golden, meta["prompt_wav"])  # noqa: E731
        yield "model input: prompt tokens", lambda: mismatches(
            frontend.tokenizer(log_mel(meta.get("prompt_frontend_case"), meta["prompt_wav"])),
            golden.array(case, "flow_prompt_speech_token").reshape(-1)), 0.0
        yield "model input: prompt mel", lambda: max_abs(prompt_mel(clip().at(rate), sample_rate=rate),
                                                         golden.array(case, "prompt_speech_feat")), FEATURE_TOLERANCE
        yield "model input: embedding", lambda: max_abs(torch.from_numpy(frontend.speaker_encoder(
            speaker_fbank(clip().at(16000)).numpy())), golden.array(case, "flow_embedding")), EMBEDDING_TOLERANCE
    if "source_wav" in meta:
        yield "model input: source tokens", lambda: mismatches(
            frontend.tokenizer(log_mel(meta.get("source_frontend_case"), meta["source_wav"])),
            golden.array(case, "source_speech_token").reshape(-1)), 0.0


def _mode_stages(model, golden: Golden, case: str):
    meta, g = golden.cases[case], lambda name: golden.array(case, name)  # noqa: E731
    t = lambda name: torch.from_numpy(g(name))  # noqa: E731
    voice = _mode_voice(golden, case)
    flow, hift = model.flow, model.hift
    yield from _model_input_stages(golden, case)
    vc = meta["kind"] == "vc"
    tokens = g("speech_token").reshape(-1).astype(np.int64).tolist()
    result = {}

    if not vc:
        text = t("text").long().reshape(1, -1)
        conditioning = model.llm_inputs(voice)

        def step_logits():
            expected = g("step_logits")
            cache = model.llm.new_cache()
            rows = [model.llm.step(model.llm.prefix(text, **conditioning), cache)]
            for i in range(len(expected) - 1):
                rows.append(model.llm.step(model.llm.embed_tokens(torch.tensor([[tokens[i]]])), cache))
            return max_abs(torch.cat(rows), expected)

        yield "lm_prefix", lambda: max_abs(model.llm.prefix(text, **conditioning), g("lm_prefix")), TOLERANCE
        yield "step_logits (kv cache)", step_logits, TOLERANCE

    def run():
        # one seeded run in the official order of draws: LLM sampling (not for VC), flow noise, HiFT source
        if not result:
            torch.manual_seed(int(meta["seed"]))
            if vc:
                result["tokens"] = g("source_speech_token").reshape(-1).astype(np.int64).tolist()
            else:
                ratio = (len(tokens) + 0.5) / text.shape[1]  # the official forcing: exactly N tokens
                result["tokens"] = list(text_to_tokens(model, text, voice, min_token_text_ratio=ratio,
                                                       max_token_text_ratio=ratio))
            result["mel"] = model.tokens_to_mel(result["tokens"], voice)
            result["wav"] = model.mel_to_wav(result["mel"])
        return result

    conditioning = model.flow_inputs(voice)
    token = torch.tensor([tokens])
    prompt_frames = 0 if conditioning["prompt_feat"] is None else conditioning["prompt_feat"].shape[1]

    def mu():
        return max_abs(flow.encode(token, conditioning["prompt_token"], prompt_frames), g("mu"))

    yield "spk_proj", lambda: max_abs(flow.project_speaker(conditioning["embedding"]), g("spk_proj")), TOLERANCE
    if golden.has(case, "flow_encoder_proj_out"):
        def encoder_proj_out():
            both = token if conditioning["prompt_token"] is None else torch.cat([conditioning["prompt_token"], token], 1)
            h, _ = flow.encoder(flow.input_embedding(both), torch.tensor([both.shape[1]]))
            return max_abs(flow.encoder_proj(h), g("flow_encoder_proj_out"))
        yield "flow_encoder_proj_out", encoder_proj_out, TOLERANCE
    yield "mu (prompt + tokens)", mu, TOLERANCE
    if golden.has(case, "cond"):
        yield "cond", lambda: max_abs(flow.prompt_cond(conditioning["prompt_feat"], g("mu").shape[2]), g("cond")), TOLERANCE
    if golden.has(case, "est_step1_out"):
        def est_step1_out():
            z, mu_, cond = t("z"), t("mu"), flow.prompt_cond(conditioning["prompt_feat"], g("mu").shape[2])
            spks = flow.project_speaker(conditioning["embedding"])
            out = flow.decoder.estimator(torch.cat([z, z]), torch.ones(2, 1, z.shape[2]),
                                         torch.cat([mu_, torch.zeros_like(mu_)]), torch.zeros(2),
                                         torch.cat([spks, torch.zeros_like(spks)]),
                                         torch.cat([cond, torch.zeros_like(cond)]))
            return max_abs(out, g("est_step1_out"))
        yield "est_step1_out", est_step1_out, TOLERANCE
    yield "mel (tokens+z -> mel)", lambda: max_abs(model.tokens_to_mel(tokens, voice, noise=t("z")), g("mel")), TOLERANCE
    yield "hift_f0", lambda: max_abs(hift.predict_f0(t("mel")), g("hift_f0")), 1e-2
    yield "wav (mel+source -> wav)", lambda: max_abs(hift.decode(t("mel"), t("hift_source")), g("wav")), WAV_TOLERANCE
    if not vc:
        yield "speech_token (seeded)", lambda: mismatches(run()["tokens"], tokens), 0.0
    yield "mel (seeded)", lambda: max_abs(run()["mel"], g("mel")), TOLERANCE
    yield "wav (seeded)", lambda: max_abs(run()["wav"], g("wav")), WAV_TOLERANCE


STAGES = {"llm": _llm_stages, "flow+hift": _flow_hift_stages, "e2e_sft": _e2e_stages,
          "frontend_audio": _frontend_audio_stages, "zero_shot": _mode_stages, "cross_lingual": _mode_stages,
          "instruct": _mode_stages, "vc": _mode_stages, "zero_shot_spk": _mode_stages}


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
