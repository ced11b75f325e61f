"""Voices of one's own against the official CosyVoice v1 outputs of the golden-modes set (tests/golden-modes/README.md).

Prompt audio -> features -> model input, then zero-shot, cross-lingual, instruct and voice conversion stage by stage in
exact mode: the LM prefix and logits, the seeded tokens, the flow with its prompt, HiFT, and the seeded waveform, which
reproduces the official one because the random draws come in the official order. Every size is read from the set, so
any set in this layout (other prompts, rates, seeds, lengths) is checked the same way.
"""
import dataclasses
import io
import json
import math

import numpy as np
import pytest
import soundfile
import torch
from golden_data import GOLDEN_MODES, assert_matches_checksums

from cosyvoice_lite.decode.lm_decoder import LMDecoder
from cosyvoice_lite.decode.reference import convert, synthesize, text_to_tokens
from cosyvoice_lite.decode.scheduler import Scheduler
from cosyvoice_lite.decode.streaming import TokenStream, stream_tokens
from cosyvoice_lite.frontend import TextFrontend
from cosyvoice_lite.frontend import onnx_models
from cosyvoice_lite.frontend.onnx_models import VoiceFrontend
from cosyvoice_lite.frontend.prompt_audio import (PromptAudioError, clip_of, load_clip, prompt_mel, speaker_fbank,
                                                  whisper_log_mel)
from cosyvoice_lite.model import load_model
from cosyvoice_lite.voices import BUILTIN, CLONED, INSTRUCTED, Voice
from cosyvoice_lite.voices import clone
from cosyvoice_lite.voices.clone import (END_OF_INSTRUCTION, VoiceMaker, clone_voice, instruct_voice,
                                         with_end_marker)

FEATURE_TOL = 1e-4     # log-mel, prompt mel (log domain), resampled audio
# Kaldi's fbank floors its log only at float32 epsilon, so its weakest bands (e^-18 of the strongest) carry the
# float32 FFT's rounding: 2e-4..6e-4 from a float64 fbank on the public clips, and two CPUs' FFTs differ by as much
FBANK_TOL = 1e-3
EMBEDDING_TOL = 1e-5
LOGITS_TOL = 1e-4
MEL_TOL = 1e-3
WAV_TOL = 1e-4
F0_TOL = 1e-2          # Hz

assert (GOLDEN_MODES / "manifest.json").is_file(), f"golden-modes data missing at {GOLDEN_MODES}"
MANIFEST = json.loads((GOLDEN_MODES / "manifest.json").read_text())
CASES = MANIFEST["cases"]
RATE = int(MANIFEST.get("sample_rate", 22050))
HOP = int(MANIFEST.get("hop", 256))


def cases_of(*kinds):
    return sorted(name for name, case in CASES.items() if case["kind"] in kinds)


FRONTEND_CASES = cases_of("frontend_audio")
TTS_CASES = cases_of("zero_shot", "cross_lingual", "instruct", "zero_shot_spk")
CLIP_CASES = cases_of("zero_shot", "cross_lingual", "zero_shot_spk", "vc")
VC_CASES = cases_of("vc")
FLOW_CASES = TTS_CASES + VC_CASES
assert FRONTEND_CASES and CLIP_CASES, "the golden-modes manifest has no prompt-audio or cloned-voice case"
CLONE = CLIP_CASES[0]  # a voice with a reference clip for the streaming tests (their tokens are made up)


def random_tokens(n, seed):
    return torch.randint(0, 4096, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def array(case, name):
    return np.load(GOLDEN_MODES / case / f"{name}.npy")


def has(case, name):
    return (GOLDEN_MODES / case / f"{name}.npy").is_file()


def tensor(case, name):
    return torch.from_numpy(array(case, name))


def max_abs(ours, theirs) -> float:
    theirs = torch.as_tensor(np.asarray(theirs))
    assert tuple(ours.shape) == tuple(theirs.shape)
    return float((ours.detach().float() - theirs.float()).abs().max()) if ours.numel() else 0.0


def wav_bytes(relative):
    return (GOLDEN_MODES / relative).read_bytes()


def stored_voice(case) -> Voice:
    """The Voice the official model input of a case amounts to (its stored arrays)."""
    kind = CASES[case]["kind"]
    if kind == "instruct":
        speaker = array(case, "flow_embedding")
        return Voice("spk", "spk", kind=BUILTIN, llm_embedding=speaker, flow_embedding=speaker).instructed(
            array(case, "prompt_text"))
    return Voice("clone", "clone", kind=CLONED,
                 llm_embedding=array(case, "llm_embedding") if has(case, "llm_embedding") else None,
                 flow_embedding=array(case, "flow_embedding"),
                 prompt_text=array(case, "prompt_text") if has(case, "prompt_text") else [],
                 prompt_speech=array(case, "flow_prompt_speech_token"),
                 prompt_mel=array(case, "prompt_speech_feat")[0])


def text(case):
    return tensor(case, "text").long().reshape(1, -1)  # (1, L)


def speech_tokens(case):
    return array(case, "speech_token").reshape(-1).astype(np.int64).tolist()


def forced_ratio(case):
    """The official forcing of exactly N tokens: min = max ratio (N + 0.5) / L of the TARGET text length L."""
    return (len(speech_tokens(case)) + 0.5) / text(case).shape[1]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)  # the set was made with 2 threads
    return load_model(GOLDEN_MODES / "model")


@pytest.fixture(scope="module")
def onnx():
    frontend = VoiceFrontend(GOLDEN_MODES / "model")
    yield frontend
    frontend.close()


@pytest.fixture(scope="module")
def seeded_runs(model):
    """Per case: one official-order run after torch.manual_seed(seed): tokens (LLM, or the VC source), mel, wav."""
    runs = {}

    def run(case):
        if case not in runs:
            voice = stored_voice(case)
            torch.manual_seed(int(CASES[case]["seed"]))
            if CASES[case]["kind"] == "vc":
                tokens = array(case, "source_speech_token").reshape(-1).astype(np.int64).tolist()
            else:
                ratio = forced_ratio(case)
                tokens = list(text_to_tokens(model, text(case), voice, min_token_text_ratio=ratio,
                                             max_token_text_ratio=ratio))
            mel = model.tokens_to_mel(tokens, voice)
            runs[case] = {"tokens": tokens, "mel": mel, "wav": model.mel_to_wav(mel)}
        return runs[case]
    return run


# ---- prompt audio: loading and resampling --------------------------------------------------------------------------

@pytest.mark.parametrize("case", FRONTEND_CASES)
def test_load_mixes_channels_by_their_mean_and_resamples_like_torchaudio(case):
    meta = CASES[case]
    clip = load_clip(wav_bytes(meta["wav"]))
    raw, rate = soundfile.read(GOLDEN_MODES / meta["wav"], dtype="float32", always_2d=True)
    assert clip.sample_rate == rate == meta.get("wav_info", {}).get("sample_rate", rate)
    assert torch.equal(clip.samples, torch.from_numpy(raw.T.copy()).mean(dim=0, keepdim=True))
    for name, target in (("speech_16k", 16000), ("speech_22050", RATE)):
        ours = clip.at(target)
        assert ours.shape[1] == math.ceil(clip.samples.shape[1] * target / rate)
        if has(case, name):
            assert max_abs(ours, array(case, name)) <= FEATURE_TOL
        else:  # stored only when the file is not already mono at that rate
            assert rate == target and raw.shape[1] == 1


@pytest.mark.parametrize("case", FRONTEND_CASES)
def test_whisper_log_mel_matches(case):
    speech_16k = load_clip(wav_bytes(CASES[case]["wav"])).at(16000)
    ours = whisper_log_mel(speech_16k)
    assert ours.shape == (1, 128, speech_16k.shape[1] // 160)
    assert max_abs(ours, array(case, "whisper_logmel")) <= FEATURE_TOL


@pytest.mark.parametrize("case", FRONTEND_CASES)
def test_kaldi_fbank_minus_its_time_mean_matches(case):
    speech_16k = load_clip(wav_bytes(CASES[case]["wav"])).at(16000)
    ours = speaker_fbank(speech_16k)
    assert ours.shape == (1 + (speech_16k.shape[1] - 400) // 160, 80)
    assert max_abs(ours, array(case, "fbank")) <= FBANK_TOL


@pytest.mark.parametrize("case", FRONTEND_CASES)
def test_prompt_mel_at_the_model_rate_matches(case):
    speech = load_clip(wav_bytes(CASES[case]["wav"])).at(RATE)
    ours = prompt_mel(speech, sample_rate=RATE)
    assert ours.shape == (1, speech.shape[1] // HOP, 80)
    assert max_abs(ours, array(case, "speech_feat")) <= FEATURE_TOL


@pytest.mark.parametrize("case", FRONTEND_CASES)
def test_speech_tokenizer_on_the_stored_log_mel_gives_the_official_tokens(case, onnx):
    log_mel = array(case, "whisper_logmel")
    tokens = onnx.tokenizer(log_mel)
    assert tokens.dtype == np.int32 and len(tokens) == math.ceil(log_mel.shape[2] / 2)
    assert tokens.tolist() == array(case, "speech_token").reshape(-1).tolist()


@pytest.mark.parametrize("case", FRONTEND_CASES)
def test_speaker_encoder_on_the_stored_fbank_gives_the_official_embedding(case, onnx):
    embedding = onnx.speaker_encoder(array(case, "fbank"))
    assert embedding.shape == (1, 192) and embedding.dtype == np.float32
    assert max_abs(torch.from_numpy(embedding), array(case, "embedding")) <= EMBEDDING_TOL


@pytest.mark.parametrize("case", FRONTEND_CASES)
def test_a_clip_of_decoded_samples_gives_the_features_of_the_file(case, onnx):
    clip = load_clip(wav_bytes(CASES[case]["wav"]))
    again = clip_of(clip.samples[0].numpy(), clip.sample_rate)
    assert torch.equal(again.samples, clip.samples) and again.sample_rate == clip.sample_rate
    if not has(case, "speech_16k") or max_abs(clip.at(16000), array(case, "speech_16k")) == 0:
        # our log-mel is the stored one bit for bit here, so the argmax hash cannot flip
        assert clone.speech_tokens(again, onnx).tolist() == array(case, "speech_token").reshape(-1).tolist()


def test_onnx_sessions_open_on_demand_and_close():
    frontend = VoiceFrontend(GOLDEN_MODES / "model")
    assert frontend.available and not frontend.tokenizer.loaded and not frontend.speaker_encoder.loaded
    frontend.speaker_encoder(np.zeros((50, 80), np.float32))
    assert frontend.speaker_encoder.loaded and not frontend.tokenizer.loaded
    frontend.close()
    assert not frontend.speaker_encoder.loaded
    assert frontend.speaker_encoder(np.zeros((50, 80), np.float32)).shape == (1, 192)  # opens again


def test_closing_the_networks_trims_the_heap_once_something_was_open(monkeypatch):
    trims = []
    monkeypatch.setattr(onnx_models, "release_free_memory", lambda: trims.append(1))
    frontend = VoiceFrontend(GOLDEN_MODES / "model")
    frontend.close()
    assert trims == []  # nothing was open: no trim (each voice closes, most find nothing to close with KEEP)
    frontend.tokenizer(np.zeros((1, 128, 20), np.float32))
    frontend.close()
    assert trims == [1] and not frontend.tokenizer.loaded


def test_a_model_directory_without_the_onnx_files_says_so(tmp_path):
    frontend = VoiceFrontend(tmp_path)
    assert not frontend.available
    with pytest.raises(FileNotFoundError, match="campplus.onnx"):
        frontend.speaker_encoder(np.zeros((50, 80), np.float32))


# ---- prompt audio: what cannot be used -----------------------------------------------------------------------------

def _wav(samples, rate, subtype="PCM_16"):
    out = io.BytesIO()
    soundfile.write(out, samples, rate, subtype=subtype, format="WAV")
    return out.getvalue()


def test_undecodable_audio_is_a_prompt_audio_error():
    with pytest.raises(PromptAudioError, match="could not be decoded"):
        load_clip(b"this is not audio at all")


def test_empty_audio_is_a_prompt_audio_error():
    with pytest.raises(PromptAudioError, match="empty"):
        load_clip(_wav(np.zeros(0, np.float32), 16000))


def test_audio_below_16_khz_is_a_prompt_audio_error():
    with pytest.raises(PromptAudioError, match="8000 Hz"):
        load_clip(_wav(np.zeros(8000, np.float32), 8000))


def test_nan_or_infinite_samples_are_a_prompt_audio_error():
    samples = np.zeros(16000, np.float32)
    samples[100] = np.nan
    with pytest.raises(PromptAudioError, match="NaN"):
        load_clip(_wav(samples, 16000, subtype="FLOAT"))
    samples[100] = np.inf
    with pytest.raises(PromptAudioError, match="infinite"):
        load_clip(_wav(samples, 16000, subtype="FLOAT"))


def test_audio_without_channels_is_a_prompt_audio_error(monkeypatch):
    monkeypatch.setattr(soundfile, "read", lambda *a, **k: (np.zeros((16000, 0), np.float32), 16000))
    with pytest.raises(PromptAudioError, match="no channels"):
        load_clip(b"RIFF")


def test_audio_longer_than_the_tokenizer_takes_is_a_prompt_audio_error():
    with pytest.raises(PromptAudioError, match="at most 30 s"):
        load_clip(_wav(np.zeros(16000 * 31, np.float32), 16000))


def test_prompt_audio_error_is_a_value_error():
    assert issubclass(PromptAudioError, ValueError)


# ---- model input of each mode, from the prompt wavs ------------------------------------------------------------------

@pytest.mark.parametrize("case", CLIP_CASES)
def test_cloned_voice_from_the_prompt_wav_has_the_official_mel_and_embedding(case, onnx):
    meta = CASES[case]
    transcript = array(case, "prompt_text").reshape(-1) if has(case, "prompt_text") else []
    voice = clone_voice(wav_bytes(meta["prompt_wav"]), onnx, transcript, sample_rate=RATE)
    assert voice.kind == CLONED and voice.id.startswith("voice_")
    assert max_abs(torch.from_numpy(voice.prompt_mel[None]), array(case, "prompt_speech_feat")) <= FEATURE_TOL
    assert max_abs(torch.from_numpy(voice.flow_embedding), array(case, "flow_embedding")) <= EMBEDDING_TOL
    assert voice.llm_embedding is voice.flow_embedding or np.array_equal(voice.llm_embedding, voice.flow_embedding)
    assert len(voice.prompt_speech) == array(case, "flow_prompt_speech_token").shape[1]


def test_voice_maker_makes_the_voice_of_decoded_samples_and_releases_the_networks():
    case = CLIP_CASES[0]
    clip = load_clip(wav_bytes(CASES[case]["prompt_wav"]))
    maker = VoiceMaker(GOLDEN_MODES / "model", sample_rate=RATE)
    decoded = clip_of(clip.samples[0].numpy(), clip.sample_rate)
    voice = maker.make_voice(decoded, [1, 2, 3], name="mine", voice_id="voice_x")
    assert (voice.id, voice.name, voice.kind, voice.prompt_text.tolist()) == ("voice_x", "mine", CLONED, [1, 2, 3])
    assert max_abs(torch.from_numpy(voice.prompt_mel[None]), array(case, "prompt_speech_feat")) <= FEATURE_TOL
    assert not maker.frontend.tokenizer.loaded and not maker.frontend.speaker_encoder.loaded
    tokens = maker.source_tokens(decoded)
    assert tokens.tolist() == voice.prompt_speech.tolist() and not maker.frontend.tokenizer.loaded


def test_voice_maker_keeps_the_networks_when_asked():
    clip = load_clip(wav_bytes(CASES[CLIP_CASES[0]]["prompt_wav"]))
    maker = VoiceMaker(GOLDEN_MODES / "model", keep_loaded=True)
    maker.source_tokens(clip)
    assert maker.frontend.tokenizer.loaded
    maker.close()
    assert not maker.frontend.tokenizer.loaded


@pytest.mark.parametrize("case", CLIP_CASES)
def test_prompt_tokens_from_the_prompt_log_mel_are_the_official_ones(case, onnx):
    meta = CASES[case]
    pairs = [(meta.get("prompt_frontend_case"), meta["prompt_wav"], "flow_prompt_speech_token")]
    if "source_wav" in meta:
        pairs.append((meta.get("source_frontend_case"), meta["source_wav"], "source_speech_token"))
    for fe_case, wav, name in pairs:
        # tokens are an argmax hash: the stored log-mel where the set has one (ours is compared with it above)
        log_mel = (array(fe_case, "whisper_logmel") if fe_case and has(fe_case, "whisper_logmel")
                   else whisper_log_mel(load_clip(wav_bytes(wav)).at(16000)).numpy())
        assert onnx.tokenizer(log_mel).tolist() == array(case, name).reshape(-1).tolist()


@pytest.fixture(scope="module")
def text_frontend():
    return TextFrontend()


@pytest.mark.parametrize("case", TTS_CASES)
def test_text_and_prompt_text_tokens_are_the_official_ones(case, text_frontend):
    meta = CASES[case]
    assert text_frontend.tokenize(meta["segment"]) == text(case)[0].tolist()
    prompt = meta.get("instruct_text_normalized", meta.get("prompt_text_normalized"))
    if meta["kind"] == "cross_lingual":
        assert not has(case, "prompt_text")  # the LLM hears no prompt text
    else:
        assert text_frontend.tokenize(prompt) == array(case, "prompt_text").reshape(-1).tolist()


def test_instructions_end_with_the_endofprompt_text(text_frontend):
    assert with_end_marker("Speak softly.") == "Speak softly." + END_OF_INSTRUCTION
    assert with_end_marker("Speak softly.<endofprompt>") == "Speak softly.<endofprompt>"
    assert text_frontend.tokenize(END_OF_INSTRUCTION) == [27, 521, 2670, 28722, 662, 29]


@pytest.mark.parametrize("case", cases_of("instruct"))
def test_an_instructed_voice_gives_the_llm_the_instruction_and_no_speaker(case, model):
    speaker = CASES[case]["spk"]
    builtin = Voice(speaker, speaker, kind=BUILTIN, llm_embedding=model.embedding(speaker).numpy(),
                    flow_embedding=model.embedding(speaker).numpy())
    voice = instruct_voice(builtin, array(case, "prompt_text"))
    assert voice.kind == INSTRUCTED and voice.llm_embedding is None and voice.prompt_mel is None
    assert np.array_equal(voice.flow_embedding, array(case, "flow_embedding"))
    assert voice.prompt_text.tolist() == array(case, "prompt_text").reshape(-1).tolist()


@pytest.mark.parametrize("case", cases_of("cross_lingual"))
def test_a_clone_without_transcript_gives_the_llm_no_prompt_speech(case):
    voice = stored_voice(case)
    assert voice.prompt_text.size == 0 and voice.llm_prompt_speech.size == 0 and voice.prompt_speech.size > 0


# ---- LLM with a prompt --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", TTS_CASES)
def test_lm_prefix_is_sos_speaker_prompt_text_text_task_prompt_speech(case, model):
    layout = CASES[case]["lm_prefix_layout"]
    with torch.inference_mode():
        prefix = model.llm.prefix(text(case), **model.llm_inputs(stored_voice(case)))
    assert prefix.shape[1] == layout["P"] == (2 + layout["spk_proj"] + layout["prompt_text"] + layout["text"]
                                              + layout["prompt_speech_token"])
    assert max_abs(prefix, array(case, "lm_prefix")) <= LOGITS_TOL


@pytest.mark.parametrize("case", TTS_CASES)
def test_first_step_logits_through_the_kv_cache_match(case, model):
    expected, tokens = array(case, "step_logits"), speech_tokens(case)
    llm = model.llm
    with torch.inference_mode():
        cache = llm.new_cache()
        rows = [llm.step(llm.prefix(text(case), **model.llm_inputs(stored_voice(case))), cache)]
        for token in tokens[:len(expected) - 1]:
            rows.append(llm.step(llm.embed_tokens(torch.tensor([[token]])), cache))
    assert max_abs(torch.cat(rows), expected) <= LOGITS_TOL


@pytest.mark.parametrize("case", TTS_CASES)
def test_length_limits_count_the_target_text_only(case, model):
    ratio = forced_ratio(case)
    with torch.inference_mode():
        seq = LMDecoder.for_model(model).start(text(case), **model.llm_inputs(stored_voice(case)),
                                               min_token_text_ratio=ratio, max_token_text_ratio=ratio)
    assert seq.min_len == seq.max_len == len(speech_tokens(case))


@pytest.mark.parametrize("case", TTS_CASES)
def test_seeded_decoding_draws_the_official_tokens(case, seeded_runs):
    assert seeded_runs(case)["tokens"] == speech_tokens(case)


@pytest.mark.parametrize("case", TTS_CASES)
def test_decoding_leaves_the_rng_where_the_official_flow_noise_starts(case, model):
    ratio = forced_ratio(case)
    torch.manual_seed(int(CASES[case]["seed"]))
    with torch.inference_mode():
        list(text_to_tokens(model, text(case), stored_voice(case), min_token_text_ratio=ratio,
                            max_token_text_ratio=ratio))
    z = array(case, "z")
    assert torch.equal(torch.randn(z.shape), torch.from_numpy(z))


@pytest.fixture(scope="module")
def default_model():
    return load_model(GOLDEN_MODES / "model", mode="default")


@pytest.mark.parametrize("case", TTS_CASES)
def test_default_mode_keeps_the_greedy_tokens_of_a_prompt(case, model, default_model):
    n = len(speech_tokens(case))
    exact, _ = LMDecoder.for_model(model).greedy(text(case), n=n, **model.llm_inputs(stored_voice(case)))
    lean, _ = LMDecoder.for_model(default_model).greedy(text(case), n=n,
                                                        **default_model.llm_inputs(stored_voice(case)))
    assert lean == exact


# ---- flow with a prompt, HiFT -----------------------------------------------------------------------------------------

def flow_tokens(case):
    return torch.tensor([speech_tokens(case)])  # (1, N): the LLM's tokens, or the VC source tokens


@pytest.mark.parametrize("case", FLOW_CASES)
def test_flow_speaker_projection_matches(case, model):
    with torch.inference_mode():
        spks = model.flow.project_speaker(model.flow_inputs(stored_voice(case))["embedding"])
    assert max_abs(spks, array(case, "spk_proj")) <= LOGITS_TOL


@pytest.mark.parametrize("case", FLOW_CASES)
def test_mu_stretches_prompt_tokens_to_the_prompt_mel_and_new_tokens_on_their_own(case, model):
    lengths = CASES[case]["flow_lengths"]
    inputs = model.flow_inputs(stored_voice(case))
    with torch.inference_mode():
        mu = model.flow.encode(flow_tokens(case), inputs["prompt_token"], lengths["Fp"])
    assert mu.shape[2] == lengths["Fp"] + lengths["F"] == lengths["Fp"] + model.flow.n_frames(lengths["N"])
    assert max_abs(mu, array(case, "mu")) <= LOGITS_TOL


@pytest.mark.parametrize("case", [c for c in FLOW_CASES if has(c, "flow_encoder_proj_out")])
def test_flow_encoder_reads_prompt_tokens_then_new_tokens(case, model):
    inputs = model.flow_inputs(stored_voice(case))
    token = torch.cat([inputs["prompt_token"], flow_tokens(case)], dim=1)
    with torch.inference_mode():
        h, _ = model.flow.encoder(model.flow.input_embedding(token), torch.tensor([token.shape[1]]))
        assert max_abs(model.flow.encoder_proj(h), array(case, "flow_encoder_proj_out")) <= LOGITS_TOL


@pytest.mark.parametrize("case", [c for c in FLOW_CASES if has(c, "cond")])
def test_cond_is_the_prompt_mel_then_zeros(case, model):
    prompt = model.flow_inputs(stored_voice(case))["prompt_feat"]
    cond = model.flow.prompt_cond(prompt, array(case, "mu").shape[2])
    assert torch.equal(cond, tensor(case, "cond"))


@pytest.mark.parametrize("case", [c for c in FLOW_CASES if has(c, "est_step1_out")])
def test_first_estimator_call_with_the_prompt_condition_matches(case, model):
    inputs = model.flow_inputs(stored_voice(case))
    z, mu = tensor(case, "z"), tensor(case, "mu")
    cond = model.flow.prompt_cond(inputs["prompt_feat"], mu.shape[2])
    spks = model.flow.project_speaker(inputs["embedding"])
    with torch.inference_mode():  # row 0 conditional, row 1 the CFG-unconditional one (mu, spks, cond zero)
        out = model.flow.decoder.estimator(torch.cat([z, z]), torch.ones(2, 1, z.shape[2]),
                                           torch.cat([mu, torch.zeros_like(mu)]), torch.zeros(2),
                                           torch.cat([spks, torch.zeros_like(spks)]),
                                           torch.cat([cond, torch.zeros_like(cond)]))
    assert max_abs(out, array(case, "est_step1_out")) <= LOGITS_TOL


@pytest.mark.parametrize("case", FLOW_CASES)
def test_flow_from_the_stored_noise_gives_the_official_mel_without_the_prompt_frames(case, model):
    with torch.inference_mode():
        mel = model.tokens_to_mel(speech_tokens(case), stored_voice(case), noise=tensor(case, "z"))
    assert mel.shape == (1, 80, CASES[case]["flow_lengths"]["F"])
    assert max_abs(mel, array(case, "mel")) <= MEL_TOL


@pytest.mark.parametrize("case", FLOW_CASES)
def test_hift_f0_and_waveform_from_the_stored_mel_and_source_match(case, model):
    with torch.inference_mode():
        assert max_abs(model.hift.predict_f0(tensor(case, "mel")), array(case, "hift_f0")) <= F0_TOL
        wav = model.hift.decode(tensor(case, "mel"), tensor(case, "hift_source"))
    assert wav.shape[1] == CASES[case]["flow_lengths"]["F"] * HOP
    assert max_abs(wav, array(case, "wav")) <= WAV_TOL


# ---- end to end, seeded: the official draws in the official order ---------------------------------------------------

@pytest.mark.parametrize("case", FLOW_CASES)
def test_seeded_run_reproduces_the_official_mel_and_waveform(case, seeded_runs):
    run = seeded_runs(case)
    assert max_abs(run["mel"], array(case, "mel")) <= MEL_TOL
    assert max_abs(run["wav"], array(case, "wav")) <= WAV_TOL


@pytest.mark.parametrize("case", TTS_CASES)
def test_synthesize_with_a_voice_is_the_seeded_run(case, model, seeded_runs):
    ratio = forced_ratio(case)
    wav = synthesize(model, text(case), stored_voice(case), seed=int(CASES[case]["seed"]),
                     min_token_text_ratio=ratio, max_token_text_ratio=ratio)
    assert torch.equal(wav, seeded_runs(case)["wav"])


@pytest.mark.parametrize("case", VC_CASES)
def test_voice_conversion_reproduces_the_official_waveform(case, model):
    source = array(case, "source_speech_token").reshape(-1)
    wav = convert(model, source, stored_voice(case), seed=int(CASES[case]["seed"]))
    assert max_abs(wav, array(case, "wav")) <= WAV_TOL


# ---- streaming with a prompt ------------------------------------------------------------------------------------------

def test_a_single_chunk_stream_with_a_prompt_equals_whole_synthesis(model):
    voice, tokens = stored_voice(CLONE), random_tokens(60, 0)
    stream = TokenStream(model, voice, generator=torch.Generator().manual_seed(5))
    for token in tokens:
        stream.push(token)
    wav = stream.finish()
    g = torch.Generator().manual_seed(5)
    Fp = voice.prompt_mel.shape[0]
    noise = torch.randn(1, 80, Fp + model.flow.n_frames(len(tokens)), generator=g)  # prompt frames included
    with torch.inference_mode():
        mel = model.tokens_to_mel(tokens, voice, noise=noise)
        ref, _ = model.hift(mel, generator=g)
    assert torch.equal(wav, ref)


def test_a_streamed_clone_reads_the_prompt_in_every_chunk_and_keeps_the_length(model):
    voice, tokens = stored_voice(CLONE), random_tokens(170, 1)
    encoded = []
    encode = model.flow.encode
    model.flow.encode = lambda token, prompt_token=None, prompt_frames=0: (
        encoded.append((token.shape[1], prompt_frames)) or encode(token, prompt_token, prompt_frames))
    try:
        chunks = list(stream_tokens(model, tokens, voice, first_hop=30, generator=torch.Generator().manual_seed(0)))
    finally:
        del model.flow.encode
    Fp = voice.prompt_mel.shape[0]
    assert len(chunks) == len(encoded) == 3 and all(frames == Fp for _, frames in encoded)  # 30+20, 100+20, 40
    total = sum(c.shape[1] for c in chunks)
    assert abs(total - model.flow.n_frames(len(tokens)) * HOP) <= 4 * HOP  # chunking rounds frames per chunk


def test_clone_chunks_of_two_streams_in_one_flow_batch_match_one_by_one(model):
    voice = stored_voice(CLONE)
    tokens = [random_tokens(80, 2), random_tokens(80, 3)]

    def streams():
        out = []
        for i in range(2):
            stream = TokenStream(model, voice, first_hop=30, generator=torch.Generator().manual_seed(i))
            for token in tokens[i]:
                stream.push(token)
            out.append(stream)
        return out

    alone = [s.chunk() for s in streams()]
    together = TokenStream.chunk_many(streams())
    for ours, ref in zip(together, alone):
        assert float((ours - ref).norm() / ref.norm()) < 5e-3  # float rounding differs with the batch size


def test_streams_with_prompts_of_other_lengths_are_not_batched(model):
    voice = stored_voice(CLONE)
    a = TokenStream(model, voice, first_hop=30)
    longer = np.concatenate([voice.prompt_mel, voice.prompt_mel[-1:]])  # one more prompt frame
    b = TokenStream(model, dataclasses.replace(voice, prompt_mel=longer), first_hop=30)
    for stream in (a, b):
        for token in range(60):
            stream.push(token)
    with pytest.raises(ValueError, match="one size"):
        TokenStream.chunk_many([a, b])


@pytest.fixture(scope="module")
def scheduler(model):
    s = Scheduler(model, max_batch=2, first_hop=20)
    yield s
    s.close()


def test_scheduler_streams_a_cloned_voice_reproducibly(model, scheduler):
    case = cases_of("zero_shot")[0]
    segments = [text(case)[0].tolist()]
    run = lambda: np.concatenate(list(scheduler.submit(segments, stored_voice(case), seed=3,  # noqa: E731
                                                       min_token_text_ratio=1, max_token_text_ratio=1)))
    first, second = run(), run()
    assert np.array_equal(first, second)
    assert abs(first.size - model.flow.n_frames(text(case).shape[1]) * HOP) <= 4 * HOP


def test_scheduler_voice_conversion_streams_the_source_tokens_like_stream_tokens(model, scheduler):
    voice, source = stored_voice(CLONE), np.array(random_tokens(150, 4), dtype=np.int32)
    chunks = list(scheduler.submit_conversion(source, voice, seed=7))
    mode = model.mode
    expected = list(stream_tokens(model, source, voice, first_hop=20, generator=torch.Generator().manual_seed(7),
                                  first_overlap=mode.first_overlap, first_cache=mode.first_cache))
    assert len(chunks) == len(expected) == 3  # 20+20, 100+20, the last 30 tokens
    assert np.array_equal(np.concatenate(chunks), torch.cat(expected, dim=1)[0].numpy())


def test_voice_conversion_needs_a_voice_with_a_clip(model, scheduler):
    speaker = next(iter(model.speakers))
    builtin = Voice(speaker, speaker, llm_embedding=model.embedding(speaker).numpy(),
                    flow_embedding=model.embedding(speaker).numpy())
    with pytest.raises(ValueError, match="reference clip"):
        scheduler.submit_conversion([1, 2, 3], builtin)


# ---- the copy in the repository -------------------------------------------------------------------------------------

def test_the_golden_modes_copy_in_the_repository_matches_its_checksums():
    """tests/golden-modes copies the public set; its model weights are links to the identical tests/golden/model."""
    from pathlib import Path
    root = Path(__file__).resolve().parent / "golden-modes"
    assert_matches_checksums(root)
