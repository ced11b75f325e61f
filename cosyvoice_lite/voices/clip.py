"""A reference or source clip as a client sends it: decoded, checked and downmixed before any model sees it.

Every refusal is a ``BadClip`` whose message says what is wrong and what is accepted, found from the header where it
can be (a header that claims hours is refused before anything is read)."""
from __future__ import annotations

import io

import numpy as np

MAX_SECONDS = 30.0      # the speech tokenizer's limit
MIN_SECONDS = 0.5       # less has no speech to take a voice from
MIN_RATE = 16000        # the features are computed at 16 kHz: a lower rate has no content up there
MAX_RATE = 192000
SILENCE = 1e-4          # peak below this (about -80 dBFS): nothing to take a voice from


class BadClip(ValueError):
    pass


def read_clip(data: bytes, what: str = "audio") -> tuple[np.ndarray, int]:
    """``data`` (WAV, FLAC, OGG, ... as libsndfile reads them) -> (mono float32 samples, sample rate). Samples are
    int16 / 32768 for 16-bit files, channels averaged (as the official frontend loads them)."""
    import soundfile

    if not data:
        raise BadClip(f"the {what} file is empty")
    claimed = _wav_data_bytes(data)
    if claimed is not None and claimed > len(data):
        # libsndfile would read what is there; a header that lies about the length is a broken or hostile file
        raise BadClip(f"the {what} file's header claims {claimed} bytes of samples but the file has {len(data)}")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            if channels < 1:
                raise BadClip(f"the {what} has no channels")
            if not MIN_RATE <= rate <= MAX_RATE:
                raise BadClip(f"the {what} is sampled at {rate} Hz; send {MIN_RATE} Hz or more (up to {MAX_RATE})")
            if frames > MAX_SECONDS * rate:
                raise BadClip(f"the {what} is {frames / rate:.1f} s long; the limit is {MAX_SECONDS:g} s")
            samples = f.read(int(MAX_SECONDS * rate) + 1, dtype="float32", always_2d=True)
    except BadClip:
        raise
    except (RuntimeError, ValueError, TypeError, soundfile.LibsndfileError) as e:
        raise BadClip(f"the {what} could not be decoded ({str(e)[:120]}); send WAV, FLAC or OGG") from None
    if samples.shape[0] > MAX_SECONDS * rate:
        raise BadClip(f"the {what} is longer than {MAX_SECONDS:g} s")
    if samples.shape[0] < MIN_SECONDS * rate:
        raise BadClip(f"the {what} is {samples.shape[0] / rate:.2f} s long; send at least {MIN_SECONDS:g} s of speech")
    if not np.isfinite(samples).all():
        raise BadClip(f"the {what} has samples that are not numbers (NaN or infinity)")
    mono = samples.mean(axis=1, dtype=np.float32)
    if float(np.abs(mono).max()) < SILENCE:
        raise BadClip(f"the {what} is silent")
    return np.ascontiguousarray(mono), rate


def _wav_data_bytes(data: bytes) -> int | None:
    """The size a RIFF/WAVE file's 'data' chunk claims, or None (not WAV, no data chunk in the first 64 KiB)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    at = 12
    while at + 8 <= min(len(data), 65536):
        size = int.from_bytes(data[at + 4:at + 8], "little")
        if data[at:at + 4] == b"data":
            return at + 8 + size
        at += 8 + size + (size & 1)
    return None
