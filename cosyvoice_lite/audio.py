"""Sample-rate conversion and the audio encodings the service sends.

Everything the service emits is 24 kHz mono. Engines hand over float32 chunks; an ``Encoder`` turns them into
bytes of one format, chunk by chunk, so the same code serves whole files and chunked streams:

    enc = make_encoder("wav", streaming=True)
    out = [enc.start()] + [enc.encode(chunk) for chunk in chunks] + [enc.finish()]

WAV, PCM and MP3 encode incrementally; FLAC and Opus (in Ogg) need the whole signal and come out in ``finish``.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import soxr

SAMPLE_RATE = 24000  # the one output rate: every engine yields it, every format and the audio cache carry it
# Full scale of 16-bit PCM: +-1.0 -> +-32767 (symmetric; -32768 never occurs). The one 16-bit rounding is quantize
# below: the encoders and the audio cache both use it, so a cached segment encodes to the bytes a fresh synthesis
# would.
PCM16_SCALE = 32767.0

# format -> (Content-Type, file extension)
FORMATS = {
    "wav": ("audio/wav", "wav"),
    "pcm": ("audio/pcm", "pcm"),
    "mp3": ("audio/mpeg", "mp3"),
    "opus": ("audio/ogg; codecs=opus", "opus"),
    "flac": ("audio/flac", "flac"),
}
STREAMABLE_FORMATS = ("wav", "pcm", "mp3")

MP3_BITRATE_KBPS = 64  # mono 24 kHz speech (MPEG-2 layer III)


class Resampler:
    """Band-limited streaming resampler (soxr): feed chunks, then ``flush`` for the filter's tail."""

    def __init__(self, in_rate: int, out_rate: int = SAMPLE_RATE):
        self.passthrough = in_rate == out_rate
        if not self.passthrough:
            self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")

    def process(self, chunk: np.ndarray) -> np.ndarray:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        return chunk if self.passthrough else self._stream.resample_chunk(chunk)

    def flush(self) -> np.ndarray:
        if self.passthrough:
            return np.zeros(0, np.float32)
        return self._stream.resample_chunk(np.zeros(0, np.float32), last=True)


def resample(audio: np.ndarray, in_rate: int, out_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Whole-signal band-limited resampling (never a relabelled rate)."""
    if in_rate == out_rate:
        return np.asarray(audio, dtype=np.float32)
    return soxr.resample(np.asarray(audio, dtype=np.float32), in_rate, out_rate, quality="HQ")


def quantize(audio: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 samples: clipped, scaled by PCM16_SCALE in float32, rounded half to even."""
    scaled = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * np.float32(PCM16_SCALE)
    return np.rint(scaled).astype(np.int16)


def dequantize(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> float32 that quantize turns back into the same int16."""
    return np.asarray(pcm).astype(np.float32) / np.float32(PCM16_SCALE)


def to_pcm16(audio: np.ndarray) -> bytes:
    """float [-1, 1] -> little-endian signed 16-bit bytes (quantize)."""
    return quantize(audio).astype("<i2", copy=False).tobytes()


def wav_header(num_samples: int | None, rate: int = SAMPLE_RATE, channels: int = 1, bits: int = 16) -> bytes:
    """A 44-byte RIFF/WAVE header for PCM. ``num_samples=None`` writes 0xFFFFFFFF sizes, the usual marker of a
    stream whose length is unknown (ffmpeg, sox, browsers and soundfile read the data until EOF)."""
    block_align = channels * bits // 8
    if num_samples is None:
        data_size = riff_size = 0xFFFFFFFF
    else:
        data_size = num_samples * block_align
        riff_size = 36 + data_size
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block_align, block_align, bits)
            + b"data" + struct.pack("<I", data_size))


class Encoder:
    """Chunk-wise encoder; ``start`` -> ``encode``* -> ``finish``."""

    content_type = "application/octet-stream"

    def start(self) -> bytes:
        return b""

    def encode(self, chunk: np.ndarray) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""


class PcmEncoder(Encoder):
    content_type = FORMATS["pcm"][0]

    def encode(self, chunk):
        return to_pcm16(chunk)


class WavEncoder(Encoder):
    """Streaming: header with unknown length first. Whole file: header with the exact length at the end of
    ``finish`` is impossible to prepend, so the whole-file case buffers and emits everything in ``finish``."""

    content_type = FORMATS["wav"][0]

    def __init__(self, streaming: bool):
        self.streaming = streaming
        self._parts: list[bytes] = []

    def start(self):
        return wav_header(None) if self.streaming else b""

    def encode(self, chunk):
        data = to_pcm16(chunk)
        if self.streaming:
            return data
        self._parts.append(data)
        return b""

    def finish(self):
        if self.streaming:
            return b""
        data = b"".join(self._parts)
        self._parts = []
        return wav_header(len(data) // 2) + data


class Mp3Encoder(Encoder):
    content_type = FORMATS["mp3"][0]

    def __init__(self):
        import lameenc

        self._started = False
        self._lame = lameenc.Encoder()
        self._lame.set_in_sample_rate(SAMPLE_RATE)
        self._lame.set_channels(1)
        self._lame.set_bit_rate(MP3_BITRATE_KBPS)
        self._lame.set_quality(2)

    def encode(self, chunk):
        pcm = to_pcm16(chunk)
        if not pcm:
            return b""
        self._started = True
        return bytes(self._lame.encode(pcm))

    def finish(self):
        head = b""
        if not self._started:  # lame cannot flush an empty stream: give one silent frame
            head = self.encode(np.zeros(1152, np.float32))
        return head + bytes(self._lame.flush())


class SoundFileEncoder(Encoder):
    """FLAC (16-bit) and Ogg Opus through libsndfile; needs the whole signal, so everything comes in finish."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.content_type = FORMATS[fmt][0]
        self._chunks: list[np.ndarray] = []

    def encode(self, chunk):
        self._chunks.append(np.asarray(chunk, dtype=np.float32))
        return b""

    def finish(self):
        import soundfile

        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        self._chunks = []
        if self.fmt == "opus" and len(audio) == 0:
            audio = np.zeros(SAMPLE_RATE // 50, np.float32)  # libopus needs at least one frame
        buf = io.BytesIO()
        container, subtype = ("OGG", "OPUS") if self.fmt == "opus" else ("FLAC", "PCM_16")
        soundfile.write(buf, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format=container, subtype=subtype)
        return buf.getvalue()


def make_encoder(fmt: str, streaming: bool = False) -> Encoder:
    if fmt == "wav":
        return WavEncoder(streaming)
    if fmt == "pcm":
        return PcmEncoder()
    if fmt == "mp3":
        return Mp3Encoder()
    if fmt in ("flac", "opus"):
        if streaming:
            raise ValueError(f"{fmt} cannot be streamed; stream one of {', '.join(STREAMABLE_FORMATS)}")
        return SoundFileEncoder(fmt)
    raise ValueError(f"unknown format {fmt!r}")


def encode(audio: np.ndarray, fmt: str) -> bytes:
    """Encode a whole float signal at SAMPLE_RATE."""
    enc = make_encoder(fmt)
    return enc.start() + enc.encode(audio) + enc.finish()
