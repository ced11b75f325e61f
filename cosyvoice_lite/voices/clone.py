"""Voices of one's own: a cloned voice from a reference clip, an instructed voice from a speaker and an instruction.

    frontend = VoiceFrontend(model_dir)                       # the two ONNX networks, opened on first use
    voice = clone_voice(wav_bytes, frontend, transcript_tokens)   # zero-shot (with the clip's transcript tokens)
    voice = clone_voice(wav_bytes, frontend)                  # cross-lingual (no transcript)
    voice = clone_voice(clip_of(samples, rate), frontend, ...)    # from samples already decoded
    voice = instruct_voice(builtin, instruction_tokens)       # CosyVoice-300M-Instruct
    tokens = speech_tokens(source_bytes, frontend)            # a VC source clip's speech tokens
    maker = VoiceMaker(model_dir)                             # the same on a checked Clip: what the engine runs

A clone holds what the official frontend_zero_shot extracts from the clip: its 50 Hz speech tokens (tokenizer on
the 16 kHz whisper log-mel), its speaker embedding (speaker encoder on the 16 kHz Kaldi fbank) for both the LLM and
the flow, and its mel at the model's rate for the flow's prompt. The same Voice serves for voice conversion, where
its tokens, mel and embedding condition the flow alone.
"""
from __future__ import annotations

import numpy as np

from ..frontend.prompt_audio import Clip, load_clip, prompt_mel, speaker_fbank, whisper_log_mel
from .voice import CLONED, Voice

# CosyVoice-300M-Instruct was trained with instructions ending in this literal text (not a special token).
END_OF_INSTRUCTION = "<endofprompt>"


def with_end_marker(instruction: str) -> str:
    """The instruction text as the Instruct model expects it: ending with END_OF_INSTRUCTION (added if missing)."""
    instruction = instruction.rstrip()
    return instruction if instruction.endswith(END_OF_INSTRUCTION) else instruction + END_OF_INSTRUCTION


def _clip(audio) -> Clip:
    return audio if isinstance(audio, Clip) else load_clip(audio)


def speech_tokens(audio, frontend) -> np.ndarray:
    """(N,) int32 50 Hz speech tokens of a clip (bytes, path, file or Clip): a voice conversion's source."""
    return frontend.tokenizer(whisper_log_mel(_clip(audio).at(16000)).numpy())


def clone_features(audio, frontend, sample_rate: int = 22050) -> dict:
    """The arrays of a clip a Voice is made of: speech_token (Np,) int32, embedding (1, 192) float32,
    prompt_mel (Fp, 80) float32 at `sample_rate`. Raises PromptAudioError for unusable audio."""
    clip = _clip(audio)
    speech_16k = clip.at(16000)
    return {
        "speech_token": frontend.tokenizer(whisper_log_mel(speech_16k).numpy()),
        "embedding": frontend.speaker_encoder(speaker_fbank(speech_16k).numpy()),
        "prompt_mel": prompt_mel(clip.at(sample_rate), sample_rate=sample_rate)[0].numpy(),
    }


def clone_voice(audio, frontend, transcript_tokens=(), voice_id: str | None = None, name: str | None = None,
                language: str = "und", sample_rate: int = 22050) -> Voice:
    """A cloned Voice from a reference clip (bytes, path, binary file or Clip) and, optionally, the text tokens of
    what is said in it. With a transcript the LLM continues the clip (zero-shot); without one the LLM hears only
    the speaker embedding and the flow the whole clip (cross-lingual). The id defaults to 'voice_' + a prefix of the
    voice's fingerprint, so the same clip and transcript give the same id."""
    features = clone_features(audio, frontend, sample_rate)
    embedding = features["embedding"]
    voice = Voice(voice_id or "voice", name or voice_id or "cloned voice", language, kind=CLONED,
                  llm_embedding=embedding, flow_embedding=embedding,
                  prompt_text=np.asarray(transcript_tokens, dtype=np.int32),
                  prompt_speech=features["speech_token"], prompt_mel=features["prompt_mel"])
    if voice_id is None:
        voice = Voice(f"voice_{voice.fingerprint[:16]}", name or f"voice_{voice.fingerprint[:8]}", language,
                      kind=CLONED, llm_embedding=embedding, flow_embedding=embedding,
                      prompt_text=voice.prompt_text, prompt_speech=voice.prompt_speech, prompt_mel=voice.prompt_mel)
    return voice


def instruct_voice(voice: Voice, instruction_tokens) -> Voice:
    """`voice` (a built-in speaker) told how to speak: the instruction's text tokens (of with_end_marker(text))
    become the LLM's prompt, the LLM loses the speaker embedding, the flow keeps it."""
    if voice.flow_embedding is None:
        raise ValueError(f"voice {voice.id!r} has no speaker embedding to instruct")
    return voice.instructed(instruction_tokens)


class VoiceMaker:
    """What an engine needs to make voices and convert clips, on clips already decoded and checked (prompt_audio.
    clip_of on the samples voices.clip.read_clip returns). The two ONNX networks of ``model_dir`` are opened for each call
    and released after it, unless ``keep_loaded`` (faster for the next voice, at the cost of holding them).
    Run the calls on the thread that runs torch (Scheduler.call): they use torch and onnxruntime threads."""

    def __init__(self, model_dir, sample_rate: int = 22050, keep_loaded: bool = False, threads: int = 1):
        from ..frontend.onnx_models import VoiceFrontend  # onnxruntime is imported only when a session opens

        self.frontend = VoiceFrontend(model_dir, threads)
        self.sample_rate = sample_rate
        self.keep_loaded = keep_loaded

    @property
    def available(self) -> bool:
        """Whether the model directory has the speech tokenizer and the speaker encoder."""
        return self.frontend.available

    def make_voice(self, clip: Clip, transcript_tokens=(), name: str | None = None,
                   voice_id: str | None = None, language: str = "und") -> Voice:
        """A cloned Voice (zero-shot with transcript tokens, cross-lingual without) from a decoded, checked clip
        (prompt_audio.clip_of)."""
        try:
            return clone_voice(clip, self.frontend, transcript_tokens, voice_id=voice_id, name=name,
                               language=language, sample_rate=self.sample_rate)
        finally:
            self._done()

    def source_tokens(self, clip: Clip) -> np.ndarray:
        """(N,) int32 speech tokens of a decoded, checked source clip, for Scheduler.submit_conversion."""
        try:
            return speech_tokens(clip, self.frontend)
        finally:
            self._done()

    def _done(self) -> None:
        if not self.keep_loaded:
            self.frontend.close()

    def close(self) -> None:
        self.frontend.close()
