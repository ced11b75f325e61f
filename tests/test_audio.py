"""Resampling, encoders and the offline Piper voice (cosyvoice_lite/audio.py, cosyvoice_lite/engines/piper.py)."""
from __future__ import annotations

import io
import struct
import threading

import numpy as np
import pytest
import soundfile

from cosyvoice_lite import audio
from cosyvoice_lite.cancel import Cancelled
from cosyvoice_lite.engines import SynthesisError


def sine(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def test_resample_keeps_pitch_and_duration():
    out = audio.resample(sine(1000, 22050), 22050, 24000)
    assert abs(len(out) - 24000) <= 2
    assert abs(peak_hz(out, 24000) - 1000) < 2  # a relabelled rate would read 1088 Hz


def test_resample_removes_nothing_in_band_and_adds_no_alias():
    out = audio.resample(sine(10000, 22050), 22050, 24000)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    freqs = np.fft.rfftfreq(len(out), 1 / 24000)
    assert abs(peak_hz(out, 24000) - 10000) < 2
    assert spectrum[freqs > 11100].max() < 1e-3 * spectrum.max()  # nothing above the source's Nyquist


def test_streaming_resampler_matches_whole_signal():
    x = sine(440, 22050, 2.0)
    stream = audio.Resampler(22050, 24000)
    pieces = [stream.process(x[i:i + 3000]) for i in range(0, len(x), 3000)] + [stream.flush()]
    chunked = np.concatenate(pieces)
    whole = audio.resample(x, 22050, 24000)
    assert abs(len(chunked) - len(whole)) <= 2
    n = min(len(chunked), len(whole))
    assert np.max(np.abs(chunked[:n] - whole[:n])) < 1e-3


def test_to_pcm16_clips_and_rounds():
    pcm = np.frombuffer(audio.to_pcm16(np.array([0.0, 1.0, -1.0, 2.0, -2.0, 0.5], np.float32)), "<i2")
    assert pcm.tolist() == [0, 32767, -32767, 32767, -32767, 16384]


def test_the_audio_cache_rounds_to_16_bits_exactly_as_the_encoders_do():
    from cosyvoice_lite import cache

    x = np.random.default_rng(0).uniform(-1.2, 1.2, 48000).astype(np.float32)
    x[:4] = [0.5 / 32767, 1.5 / 32767, -2.5 / 32767, 1.0]  # halfway cases
    assert cache.quantize(x).astype("<i2").tobytes() == audio.to_pcm16(x)
    assert audio.to_pcm16(cache.dequantize(cache.quantize(x))) == audio.to_pcm16(x)


def test_the_output_rate_and_the_16_bit_scale_are_written_once():
    """audio.py defines them; every other module imports them (a second copy would drift)."""
    import ast
    from pathlib import Path

    package = Path(audio.__file__).parent
    copies = [f"{path.relative_to(package)}:{node.lineno}" for path in sorted(package.rglob("*.py"))
              if path != package / "audio.py" for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Constant) and type(node.value) in (int, float)
              and node.value in (24000, 32767, 32768)]
    assert copies == []


def test_the_web_page_plays_raw_pcm_at_the_service_rate():
    from pathlib import Path

    page = (Path(audio.__file__).parent / "static" / "app.js").read_text()
    assert f"const RATE = {audio.SAMPLE_RATE};" in page


def test_wav_header_known_and_unknown_length():
    x = sine(300, 24000, 0.5)
    whole = audio.encode(x, "wav")
    info = soundfile.info(io.BytesIO(whole))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (24000, 1, 12000, "PCM_16")
    header = audio.wav_header(None)
    assert len(header) == 44 and struct.unpack("<I", header[40:44])[0] == 0xFFFFFFFF
    streamed, rate = soundfile.read(io.BytesIO(header + audio.to_pcm16(x)))
    assert rate == 24000 and len(streamed) == 12000


@pytest.mark.parametrize("fmt,container", [("mp3", "MP3"), ("flac", "FLAC"), ("opus", "OGG"), ("wav", "WAV")])
def test_encoded_formats_decode_at_24khz(fmt, container):
    data = audio.encode(sine(500, 24000, 1.0), fmt)
    info = soundfile.info(io.BytesIO(data))
    assert (info.format, info.samplerate, info.channels) == (container, 24000, 1)
    decoded, _ = soundfile.read(io.BytesIO(data))
    assert abs(len(decoded) / 24000 - 1.0) < 0.1
    assert abs(peak_hz(decoded[:24000], 24000) - 500) < 3


def test_mp3_stream_encoder_emits_frames_as_it_goes():
    enc = audio.make_encoder("mp3", streaming=True)
    parts = [enc.start()] + [enc.encode(sine(400, 24000, 0.5)) for _ in range(4)]
    assert sum(len(p) for p in parts) > 0  # frames out before finish
    data = b"".join(parts) + enc.finish()
    decoded, rate = soundfile.read(io.BytesIO(data))
    assert rate == 24000 and abs(len(decoded) / rate - 2.0) < 0.1


def test_whole_file_formats_cannot_stream():
    for fmt in ("flac", "opus"):
        with pytest.raises(ValueError, match="cannot be streamed"):
            audio.make_encoder(fmt, streaming=True)


def test_empty_audio_encodes_in_every_format():
    for fmt in audio.FORMATS:
        assert isinstance(audio.encode(np.zeros(0, np.float32), fmt), bytes)


# ---- the offline voice ----------------------------------------------------------------------------------------

def synth(engine, text, **kwargs):
    return np.concatenate(list(engine.speak(text, **kwargs)))


def test_piper_speaks_english_at_24khz(piper_engine):
    chunks = list(piper_engine.speak("Good morning. How are you?"))
    assert len(chunks) >= 2  # one per sentence (+ resampler tail): streamable
    x = np.concatenate(chunks)
    assert x.dtype == np.float32 and 1.0 < len(x) / 24000 < 5
    assert 0.5 < np.abs(x).max() <= 1.0


def test_piper_speed_uses_length_scale(piper_engine):
    slow = len(synth(piper_engine, "Speed changes the length of speech.", speed=0.5))
    fast = len(synth(piper_engine, "Speed changes the length of speech.", speed=2.0))
    assert fast < 0.4 * slow


def test_piper_nothing_to_speak(piper_engine):
    for text in ("", "   ", "...", "\u200b"):
        with pytest.raises(SynthesisError):
            synth(piper_engine, text)


def test_piper_cuts_a_long_unpunctuated_sentence_into_pieces(piper_engine):
    voice = piper_engine._load_voice()
    pieces = piper_engine._pieces(voice, "hello world " * 100)
    assert len(pieces) >= 3 and max(len(p) for p in pieces) <= 300
    assert all(p[0] == " " for p in pieces[1:])  # cut at word boundaries


def test_piper_does_not_take_raw_phonemes_from_text(piper_engine):
    # '[[ ... ]]' is Piper's raw-phoneme syntax; from users it must be read as text, not injected.
    assert len(synth(piper_engine, "[[ həlˈoʊ ]]")) > 0


def test_piper_stops_when_cancelled(piper_engine):
    cancel = threading.Event()
    chunks = piper_engine.speak("One. Two. Three. Four. Five. Six.", cancel=cancel)
    next(chunks)
    cancel.set()
    with pytest.raises(Cancelled):
        next(chunks)
