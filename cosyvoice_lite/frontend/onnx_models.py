"""The two ONNX networks of the voice-cloning frontend, run with onnxruntime on the CPU.

``speech_tokenizer_v1.onnx``: whisper log-mel (1, 128, T) -> 50 Hz speech tokens (ceil(T / 2),).
``campplus.onnx``: mean-normalised Kaldi fbank (1, Tf, 80) -> speaker embedding (1, 192).

Sessions open on first use and ``close()`` drops them, so a server that only speaks with built-in voices never holds
them, and one that clones rarely can let them go between requests.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..memory import release_free_memory

TOKENIZER_FILE = "speech_tokenizer_v1.onnx"
SPEAKER_ENCODER_FILE = "campplus.onnx"


class OnnxModel:
    """One onnxruntime session on the CPU, opened on demand. Inputs are fed by position (the official frontend
    reads their names from the session, as exported models name them differently)."""

    def __init__(self, path: str | Path, threads: int = 1):
        self.path = Path(path)
        self.threads = threads
        self._session = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def session(self):
        with self._lock:
            if self._session is None:
                if not self.path.is_file():
                    raise FileNotFoundError(f"{self.path.name} not found in {self.path.parent}: the model directory "
                                            "has no voice-cloning frontend")
                import onnxruntime  # only servers that clone voices need it

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = self.threads
                options.inter_op_num_threads = 1
                options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
                self._session = onnxruntime.InferenceSession(str(self.path), sess_options=options,
                                                             providers=["CPUExecutionProvider"])
            return self._session

    def run(self, *inputs: np.ndarray) -> np.ndarray:
        session = self.session()
        names = [i.name for i in session.get_inputs()]
        return session.run(None, dict(zip(names, inputs)))[0]

    def close(self) -> None:
        with self._lock:
            self._session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SpeechTokenizer(OnnxModel):
    def __call__(self, log_mel) -> np.ndarray:
        """(1, 128, T) whisper log-mel -> (ceil(T / 2),) int32 speech tokens."""
        feats = np.ascontiguousarray(np.asarray(log_mel, dtype=np.float32))
        if feats.ndim != 3 or feats.shape[0] != 1:
            raise ValueError(f"log-mel must be (1, n_mels, T), got {feats.shape}")
        indices = self.run(feats, np.array([feats.shape[2]], dtype=np.int32))
        return indices.reshape(-1).astype(np.int32)


class SpeakerEncoder(OnnxModel):
    def __call__(self, fbank) -> np.ndarray:
        """(Tf, 80) mean-normalised fbank -> (1, 192) float32 speaker embedding."""
        feats = np.ascontiguousarray(np.asarray(fbank, dtype=np.float32))
        if feats.ndim == 2:
            feats = feats[None]
        return self.run(feats).reshape(1, -1).astype(np.float32)


class VoiceFrontend:
    """Both networks of a model directory, each opened when first needed; ``close()`` releases both."""

    def __init__(self, model_dir: str | Path, threads: int = 1):
        model_dir = Path(model_dir)
        self.tokenizer = SpeechTokenizer(model_dir / TOKENIZER_FILE, threads)
        self.speaker_encoder = SpeakerEncoder(model_dir / SPEAKER_ENCODER_FILE, threads)

    @property
    def available(self) -> bool:
        """Whether the model directory has both files (without opening them)."""
        return self.tokenizer.path.is_file() and self.speaker_encoder.path.is_file()

    def close(self) -> None:
        """Drop both sessions and hand their memory back to the OS."""
        opened = self.tokenizer.loaded or self.speaker_encoder.loaded
        self.tokenizer.close()
        self.speaker_encoder.close()
        if opened:
            # onnxruntime frees into the heap: without this ~165 MB of the tokenizer's stay resident (issue 29)
            release_free_memory()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
