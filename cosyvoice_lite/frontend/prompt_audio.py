"""Features of a reference clip (a voice prompt), computed as the official CosyVoice v1 frontend computes them.

    clip = load_clip(data)                      # bytes / path / file -> mono float32 at the file's rate
    speech_16k = clip.at(16000)                 # (1, n16): input of the speech tokenizer and the speaker encoder
    whisper_log_mel(speech_16k)                 # (1, 128, n16 // 160): speech_tokenizer_v1.onnx 'feats'
    speaker_fbank(speech_16k)                   # (Tf, 80): campplus.onnx 'input' (Kaldi fbank, time mean removed)
    prompt_mel(clip.at(22050))                  # (1, n22 // 256, 80): the flow's prompt mel

Every step follows the official one operation by operation in torch (no torchaudio, librosa or whisper here): the
resampler is torchaudio's windowed-sinc ``Resample`` with its defaults, the mel filter banks are librosa's Slaney
filters rebuilt in numpy, the fbank is torchaudio's Kaldi-compatible ``fbank`` with Kaldi's defaults.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F

MIN_SAMPLE_RATE = 16000   # the official load_wav refuses lower rates: the tokenizer hears up to 8 kHz
MAX_SECONDS = 30.0        # the speech tokenizer is run on at most 30 s (official assertion)


class PromptAudioError(ValueError):
    """A reference clip that cannot be used; the message is meant for the user who sent it."""


# --- loading ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    """Mono audio at its file's rate: samples (1, n) float32 (int16 / 32768 for 16-bit files)."""
    samples: torch.Tensor
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.samples.shape[1] / self.sample_rate

    def at(self, sample_rate: int) -> torch.Tensor:
        """(1, n') samples at `sample_rate` (the official load_wav(wav, sample_rate))."""
        if sample_rate == self.sample_rate:
            return self.samples
        return resample(self.samples, self.sample_rate, sample_rate)


def load_clip(data, max_seconds: float | None = MAX_SECONDS) -> Clip:
    """Decode a clip (bytes, a path or a binary file object) and mix it down to mono by the channel mean.

    Raises PromptAudioError for audio soundfile cannot decode, no channels or samples, a rate below 16 kHz,
    NaN / infinite samples, or (with max_seconds) a clip too long for the speech tokenizer."""
    source = io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise PromptAudioError(f"reference audio file not found: {source}")
    try:
        samples, sample_rate = soundfile.read(source, dtype="float32", always_2d=True)  # (n, C)
    except (RuntimeError, TypeError, ValueError, OSError) as error:  # LibsndfileError is a RuntimeError
        raise PromptAudioError(f"the reference audio could not be decoded ({error}); send WAV, FLAC or OGG") from None
    if samples.shape[1] == 0:
        raise PromptAudioError("the reference audio has no channels")
    seconds = samples.shape[0] / sample_rate
    if max_seconds is not None and seconds > max_seconds:
        raise PromptAudioError(f"the reference audio is {seconds:.1f} s long; at most {max_seconds:g} s is supported")
    mono = torch.from_numpy(np.ascontiguousarray(samples.T)).mean(dim=0, keepdim=True)  # (1, n)
    return clip_of(mono.numpy(), sample_rate)  # the checks every clip gets (empty, rate, NaN)


def clip_of(samples, sample_rate: int) -> Clip:
    """A Clip from mono samples already decoded (float32 (n,) or (1, n), e.g. voices.clip.read_clip's): refused
    when empty, below 16 kHz, or with NaN / infinite samples."""
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if samples.size == 0:
        raise PromptAudioError("the reference audio is empty")
    if sample_rate < MIN_SAMPLE_RATE:
        raise PromptAudioError(f"the reference audio is sampled at {sample_rate} Hz; at least "
                               f"{MIN_SAMPLE_RATE} Hz is needed")
    if not np.isfinite(samples).all():
        raise PromptAudioError("the reference audio contains NaN or infinite samples")
    return Clip(torch.from_numpy(np.ascontiguousarray(samples)).reshape(1, -1), int(sample_rate))


# --- resampling (torchaudio.transforms.Resample with its defaults) --------------------------------------------

@lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99):
    """Hann-windowed sinc filters, one per output phase: (new, 1, 2 * width + orig) float32, and width.

    orig / new are already divided by their gcd. Built in float64 and cast, as torchaudio does (the phase offsets
    j / new come from an integer arange divided in float32, then meet the float64 tap positions)."""
    base_freq = min(orig, new) * rolloff  # cut below the lower Nyquist rate
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1)[:, None, None] / new + idx  # (new, 1, taps) float64
    t *= base_freq
    t = t.clamp_(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t *= math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernels *= window * (base_freq / orig)
    return kernels.to(torch.float32), width


def resample(samples: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """(..., n) float32 at orig_rate -> (..., ceil(n * new / orig)) at new_rate (polyphase windowed sinc)."""
    if orig_rate == new_rate:
        return samples
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    kernel, width = _sinc_kernel(orig, new)
    shape = samples.shape
    x = samples.reshape(-1, shape[-1])
    n = x.shape[1]
    x = F.pad(x, (width, width + orig))
    y = F.conv1d(x[:, None], kernel, stride=orig)  # (B, new, n / orig): output phase j of each input block
    y = y.transpose(1, 2).reshape(x.shape[0], -1)
    length = int(torch.ceil(torch.as_tensor(new * n / orig)))
    return y[:, :length].reshape(*shape[:-1], -1)


# --- mel filter banks ---------------------------------------------------------------------------------------------

def _hz_to_slaney_mel(hz):
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asanyarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mel = hz / f_sp
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, mel)


def _slaney_mel_to_hz(mel):
    mel = np.asanyarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@lru_cache(maxsize=4)
def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                       fmax: float | None = None) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) float32 triangular filters on the Slaney mel scale with area normalisation: the
    values of librosa.filters.mel (0.10) with its defaults, computed in the same float64 steps and rounded to
    float32 at the same two places."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    mel_f = _slaney_mel_to_hz(np.linspace(_hz_to_slaney_mel(fmin), _hz_to_slaney_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    weights = np.zeros((n_mels, len(fft_freqs)), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]  # equal area per filter
    return weights


# --- whisper log-mel (speech tokenizer input) ------------------------------------------------------------------

def whisper_log_mel(speech_16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """(1, n) at 16 kHz -> (1, n_mels, n // 160): whisper's log_mel_spectrogram (25 ms windows, 10 ms hop).

    log10 power, floored 8 decades below the loudest bin of the whole clip, then scaled to about [-1, 1]."""
    window = torch.hann_window(400)
    stft = torch.stft(speech_16k, 400, 160, window=window, return_complex=True)  # (1, 201, n // 160 + 1)
    power = stft[..., :-1].abs() ** 2  # whisper drops the last (centred, half-padded) frame
    mel = torch.from_numpy(slaney_mel_filters(16000, 400, n_mels)) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# --- Kaldi fbank (speaker encoder input) --------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _kaldi_mel_banks(n_mels: int, padded: int, sample_rate: float, low_freq: float, high_freq: float) -> torch.Tensor:
    """(n_mels, padded // 2 + 1) float32 triangles on Kaldi's mel scale (1127 ln(1 + f / 700)), evenly spaced
    from low_freq to high_freq; the Nyquist bin gets no weight (Kaldi's banks stop one bin short)."""
    mel = lambda f: 1127.0 * (1.0 + f / 700.0).log()  # noqa: E731
    mel_low, mel_high = 1127.0 * math.log(1.0 + low_freq / 700.0), 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (n_mels + 1)
    b = torch.arange(n_mels).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    bin_mel = mel(sample_rate / padded * torch.arange(padded / 2)).unsqueeze(0)  # (1, padded / 2)
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return F.pad(banks, (0, 1))


def kaldi_fbank(speech_16k: torch.Tensor, n_mels: int = 80, sample_rate: float = 16000.0) -> torch.Tensor:
    """(1, n) -> (1 + (n - 400) // 160, n_mels) log mel filter-bank energies with Kaldi's defaults: 25 ms frames
    every 10 ms inside the signal (snip_edges), DC removed per frame, pre-emphasis 0.97, Povey window, 512-point
    power spectrum, banks from 20 Hz to Nyquist, natural log floored at float32 epsilon. No dither."""
    size, shift, padded = int(sample_rate * 0.025), int(sample_rate * 0.010), 512
    x = speech_16k[0]
    if x.numel() < size:
        return torch.empty(0, n_mels)
    n_frames = 1 + (x.numel() - size) // shift
    frames = x.as_strided((n_frames, size), (shift * x.stride(0), x.stride(0)))
    frames = frames - frames.mean(dim=1).unsqueeze(1)
    previous = F.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)[:, :-1]  # x[t-1], x[0] for t = 0
    frames = frames - 0.97 * previous
    frames = frames * torch.hann_window(size, periodic=False).pow(0.85).unsqueeze(0)
    frames = F.pad(frames.unsqueeze(0), (0, padded - size)).squeeze(0)
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (frames, 257)
    energies = torch.mm(power, _kaldi_mel_banks(n_mels, padded, sample_rate, 20.0, sample_rate / 2).T)
    return torch.max(energies, torch.tensor(torch.finfo(torch.float32).eps)).log()


def speaker_fbank(speech_16k: torch.Tensor) -> torch.Tensor:
    """The speaker encoder's input (Tf, 80): Kaldi fbank with its mean over time removed."""
    feat = kaldi_fbank(speech_16k)
    return feat - feat.mean(dim=0, keepdim=True)


# --- prompt mel (the flow's prompt) ---------------------------------------------------------------------------------

def prompt_mel(speech: torch.Tensor, sample_rate: int = 22050, n_fft: int = 1024, hop: int = 256, n_mels: int = 80,
               fmin: float = 0.0, fmax: float = 8000.0) -> torch.Tensor:
    """(1, n) at the model's rate -> (1, n // hop, n_mels): the mel the flow was trained on (matcha's
    mel_spectrogram): reflect padding instead of centring, magnitude (not power), natural log floored at 1e-5."""
    pad = (n_fft - hop) // 2
    y = F.pad(speech.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.view_as_real(torch.stft(y, n_fft, hop_length=hop, win_length=n_fft, window=torch.hann_window(n_fft),
                                         center=False, normalized=False, onesided=True, return_complex=True))
    spec = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)  # (1, n_fft // 2 + 1, frames)
    mel = torch.matmul(torch.from_numpy(slaney_mel_filters(sample_rate, n_fft, n_mels, fmin, fmax)), spec)
    return torch.log(torch.clamp(mel, min=1e-5)).transpose(1, 2)
