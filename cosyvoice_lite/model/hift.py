"""HiFT vocoder of CosyVoice v1: a neural source-filter front (f0 -> harmonic excitation) feeding an
iSTFTNet generator (mel + excitation -> 18-channel magnitude/phase -> inverse STFT).

Inference only. Weight norm is folded into plain `.weight` tensors when the checkpoint is read
(`normalize_hift_state_dict`), so every conv below loads as an ordinary nn.Conv1d / nn.ConvTranspose1d; which form
each one runs in comes from the precision policy HiFT is built with (``precision.py``; the official float32 layers
by default). Parameter names equal the official ones so the official hift.pt loads strictly.
"""
import math
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions.uniform import Uniform

from .precision import EXACT, Precision

_WN_SUFFIXES = {  # weight-norm key suffix -> g (magnitude) or v (direction)
    ".weight_g": "g", ".weight_v": "v",
    ".parametrizations.weight.original0": "g", ".parametrizations.weight.original1": "v",
}


def normalize_hift_state_dict(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Map any real-world hift checkpoint layout onto plain `<name>.weight` keys.

    Accepts an optional `generator.` prefix, legacy `weight_g`/`weight_v`, the newer
    `parametrizations.weight.original0/1`, or already-folded weights. Folding uses torch._weight_norm,
    the very op torch runs for weight-normed modules, so the folded weight is bit-identical.
    """
    gs, vs, out = {}, {}, {}
    for key, value in sd.items():
        if key.startswith("generator."):
            key = key[len("generator."):]
        for suffix, role in _WN_SUFFIXES.items():
            if key.endswith(suffix):
                (gs if role == "g" else vs)[key[: -len(suffix)]] = value
                break
        else:
            out[key] = value
    for name in sorted(gs.keys() | vs.keys()):
        if name not in vs:
            raise ValueError(f"hift checkpoint: weight-norm magnitude for '{name}' has no direction tensor (v / original1)")
        if name not in gs:
            raise ValueError(f"hift checkpoint: weight-norm direction for '{name}' has no magnitude tensor (g / original0)")
        if name + ".weight" in out:
            raise ValueError(f"hift checkpoint: '{name}.weight' is given both plain and weight-normed")
        out[name + ".weight"] = torch._weight_norm(vs[name], gs[name], 0)
    return out


def _randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    return torch.randn_like(x) if generator is None else torch.randn(x.shape, generator=generator, dtype=x.dtype)


class ConvRNNF0Predictor(nn.Module):
    """mel (B, in_channels, F) -> f0 in Hz (B, F): five conv3 + ELU layers, then a per-frame linear head."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512,
                 policy: Precision = EXACT):
        super().__init__()
        layers = []
        for i in range(5):
            layers += [policy.conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1,
                                     name=f"condnet.{2 * i}"), nn.ELU()]
        self.condnet = nn.Sequential(*layers)  # convs at indices 0, 2, 4, 6, 8 (official names)
        self.classifier = policy.linear(cond_channels, num_class, name="classifier")

    def forward(self, mel: Tensor) -> Tensor:
        x = self.condnet(mel).transpose(1, 2)  # (B, F, C)
        return torch.abs(self.classifier(x).squeeze(-1))  # (B, F)


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha with a learned per-channel alpha (linear scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)  # (1, C, 1)
        # in place on one temporary: the same float operations as x + (1 / (alpha + 1e-9)) * sin(x * alpha) ** 2
        s = torch.sin(x * alpha)
        return s.mul_(s).mul_(1.0 / (alpha + 1e-9)).add_(x)


class ResBlock(nn.Module):
    """HiFi-GAN residual block with Snake activations: per dilation, snake -> dilated conv -> snake -> conv."""

    def __init__(self, channels: int, kernel_size: int = 3, dilations: List[int] = (1, 3, 5),
                 policy: Precision = EXACT):
        super().__init__()
        self.convs1 = nn.ModuleList(
            policy.conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2,
                          name=f"convs1.{j}") for j, d in enumerate(dilations))
        self.convs2 = nn.ModuleList(
            policy.conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2, name=f"convs2.{j}")
            for j in range(len(dilations)))
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class SineGen(nn.Module):
    """f0 at sample rate (B, 1, T) -> noisy harmonics k*f0, k=1..H+1 (B, H+1, T); the official '1' variant (22050 Hz).

    Random draws, in order: initial phases torch Uniform(-pi, pi) of shape (B, H+1, 1) (fundamental forced to 0),
    then randn_like of the harmonics for the additive noise.
    """

    def __init__(self, sampling_rate: int, harmonic_num: int, sine_amp: float, noise_std: float, voiced_threshold: float):
        super().__init__()
        self.sampling_rate, self.harmonic_num = sampling_rate, harmonic_num
        self.sine_amp, self.noise_std, self.voiced_threshold = sine_amp, noise_std, voiced_threshold

    def forward(self, f0: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        # in place where the official code makes a new tensor (same operations, same values): at the audio sample
        # rate each (B, H+1, T) temporary is ~9 KB per mel frame, and they would all stay in the heap
        cycles = torch.cat([f0 * (k + 1) / self.sampling_rate for k in range(self.harmonic_num + 1)], dim=1)  # (B, H+1, T)
        theta = cycles.cumsum_(dim=-1).remainder_(1).mul_(2 * math.pi)
        shape = (f0.size(0), self.harmonic_num + 1, 1)
        if generator is None:  # the official draw from the global RNG
            phase = Uniform(low=-math.pi, high=math.pi).sample(sample_shape=shape)
        else:
            phase = torch.rand(shape, generator=generator) * (2 * math.pi) - math.pi
        phase[:, 0, :] = 0
        sines = theta.add_(phase).sin_().mul_(self.sine_amp)
        uv = (f0 > self.voiced_threshold).type(torch.float32)  # (B, 1, T)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = _randn_like(sines, generator).mul_(noise_amp)
        return sines.mul_(uv).add_(noise)  # (B, H+1, T)


class SineGen2(nn.Module):
    """Variant used by the official code when sampling_rate != 22050 (CosyVoice2 style, non-causal):
    the phase is integrated at frame rate and linearly re-interpolated. Draws torch.rand (B, H+1) then randn_like."""

    def __init__(self, sampling_rate: int, upsample_scale: int, harmonic_num: int, sine_amp: float, noise_std: float,
                 voiced_threshold: float):
        super().__init__()
        self.sampling_rate, self.upsample_scale, self.harmonic_num = sampling_rate, upsample_scale, harmonic_num
        self.sine_amp, self.noise_std, self.voiced_threshold = sine_amp, noise_std, voiced_threshold

    def forward(self, f0: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        f0 = f0.transpose(1, 2)  # (B, T, 1)
        harmonics = torch.multiply(f0, torch.FloatTensor([[range(1, self.harmonic_num + 2)]]))  # (B, T, H+1)
        rad = (harmonics / self.sampling_rate) % 1
        rand_ini = torch.rand(harmonics.shape[0], harmonics.shape[2], generator=generator)
        rand_ini[:, 0] = 0
        rad[:, 0, :] = rad[:, 0, :] + rand_ini
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / self.upsample_scale, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad, dim=1) * 2 * np.pi
        phase = F.interpolate(phase.transpose(1, 2) * self.upsample_scale, scale_factor=self.upsample_scale,
                              mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * self.sine_amp
        uv = (f0 > self.voiced_threshold).type(torch.float32)  # (B, T, 1)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        noise = noise_amp * _randn_like(sines, generator)
        return (sines * uv + noise).transpose(1, 2)  # (B, H+1, T)


class SourceModuleHnNSF(nn.Module):
    """Harmonics -> one excitation channel via tanh(Linear(H+1 -> 1))."""

    def __init__(self, sampling_rate: int, upsample_scale: int, harmonic_num: int = 0, sine_amp: float = 0.1,
                 add_noise_std: float = 0.003, voiced_threshod: float = 0, policy: Precision = EXACT):
        super().__init__()
        self.sine_amp = sine_amp
        if sampling_rate == 22050:
            self.l_sin_gen = SineGen(sampling_rate, harmonic_num, sine_amp, add_noise_std, voiced_threshod)
        else:
            self.l_sin_gen = SineGen2(sampling_rate, upsample_scale, harmonic_num, sine_amp, add_noise_std, voiced_threshod)
        self.l_linear = policy.linear(harmonic_num + 1, 1, name="l_linear")

    def forward(self, f0: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        sines = self.l_sin_gen(f0, generator).transpose(1, 2)  # (B, T, H+1)
        source = torch.tanh(self.l_linear(sines))  # (B, T, 1)
        # The official module also draws its (unused) noise branch; draw it too so the RNG stream stays aligned.
        if generator is None:
            torch.randn_like(source)
        return source.transpose(1, 2)  # (B, 1, T)


def _resblock_reach(kernel: int, dilations) -> int:
    """Samples on each side that one ResBlock's output sees (its dilated conv then a plain one, per dilation)."""
    return sum((kernel - 1) // 2 * d + (kernel - 1) // 2 for d in dilations)


def _body_context(upsample_rates, upsample_kernel_sizes, resblock_kernel_sizes, resblock_dilation_sizes,
                  source_kernel_sizes, source_dilation_sizes, down_rates) -> int:
    """An upper bound, in mel frames, of how far from a frame HiFTGenerator.body's inputs reach its output: each
    layer's reach at its own rate, the parallel residual blocks by the widest, the source branch as a path of its own
    from the window's edge."""
    rate, reach = 1, 3.0  # conv_pre: kernel 7 at the mel rate
    final_rate = int(np.prod(upsample_rates))
    widest = max(_resblock_reach(k, d) for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes))
    for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
        reach += math.ceil(k / u) / rate  # a transposed conv's output sample sees ceil(k / u) input samples
        rate *= u
        source = (down_rates[i] if down_rates[i] > 1 else 0) / final_rate  # downsampling conv of kernel 2u
        source += _resblock_reach(source_kernel_sizes[i], source_dilation_sizes[i]) / rate
        reach = max(reach + (1 / rate if i == len(upsample_rates) - 1 else 0), source)  # + the reflect-padded column
        reach += widest / rate
    reach += 3 / rate  # conv_post: kernel 7
    return math.ceil(reach)


class HiFTGenerator(nn.Module):
    """mel (B, in_channels, F) -> waveform (B, F * prod(upsample_rates) * hop_len)."""

    def __init__(self, in_channels: int = 80, base_channels: int = 512, nb_harmonics: int = 8, sampling_rate: int = 22050,
                 nsf_alpha: float = 0.1, nsf_sigma: float = 0.003, nsf_voiced_threshold: float = 10,
                 upsample_rates: List[int] = (8, 8), upsample_kernel_sizes: List[int] = (16, 16),
                 istft_params: Optional[Dict[str, int]] = None,
                 resblock_kernel_sizes: List[int] = (3, 7, 11),
                 resblock_dilation_sizes: List[List[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
                 source_resblock_kernel_sizes: List[int] = (7, 11),
                 source_resblock_dilation_sizes: List[List[int]] = ((1, 3, 5), (1, 3, 5)),
                 lrelu_slope: float = 0.1, audio_limit: float = 0.99, f0_predictor: Optional[nn.Module] = None,
                 policy: Precision = EXACT):
        super().__init__()
        istft_params = dict(istft_params or {"n_fft": 16, "hop_len": 4})
        self.n_fft, self.hop_len = istft_params["n_fft"], istft_params["hop_len"]
        self.sampling_rate, self.lrelu_slope, self.audio_limit = sampling_rate, lrelu_slope, audio_limit
        self.upsample_factor = int(np.prod(upsample_rates)) * self.hop_len  # waveform samples per mel frame
        self.num_kernels = len(resblock_kernel_sizes)
        spec_channels = self.n_fft + 2  # real and imaginary parts of n_fft // 2 + 1 bins

        self.m_source = SourceModuleHnNSF(sampling_rate, self.upsample_factor, nb_harmonics, nsf_alpha, nsf_sigma,
                                          nsf_voiced_threshold, policy=policy.at("m_source"))
        self.conv_pre = policy.conv1d(in_channels, base_channels, 7, padding=3, name="conv_pre")
        self.ups = nn.ModuleList(
            policy.conv_transpose1d(base_channels // 2 ** i, base_channels // 2 ** (i + 1), k, u, padding=(k - u) // 2,
                                    name=f"ups.{i}")
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)))

        # The source STFT runs at hop_len; stage i needs it downsampled to that stage's rate.
        down_rates = np.cumprod([1] + list(upsample_rates)[::-1][:-1])[::-1]
        self.source_downs, self.source_resblocks = nn.ModuleList(), nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(down_rates, source_resblock_kernel_sizes, source_resblock_dilation_sizes)):
            ch, u = base_channels // 2 ** (i + 1), int(u)
            down = policy.at(f"source_downs.{i}")
            self.source_downs.append(down.conv1d(spec_channels, ch, 1) if u == 1 else
                                     down.conv1d(spec_channels, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d, policy.at(f"source_resblocks.{i}")))

        blocks = [(i, k, d) for i in range(len(self.ups))
                  for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes)]
        self.resblocks = nn.ModuleList(ResBlock(base_channels // 2 ** (i + 1), k, d, policy.at(f"resblocks.{j}"))
                                       for j, (i, k, d) in enumerate(blocks))
        self.conv_post = policy.conv1d(base_channels // 2 ** len(self.ups), spec_channels, 7, padding=3,
                                       name="conv_post")
        # periodic Hann window computed like scipy.signal.get_window("hann", n_fft) in float64, then cast
        window = (0.5 + 0.5 * np.cos(np.linspace(-np.pi, np.pi, self.n_fft + 1)))[: self.n_fft]
        self.register_buffer("stft_window", torch.from_numpy(window.astype(np.float32)), persistent=False)
        self.f0_predictor = f0_predictor
        # An execution backend may run `body` compiled elsewhere (backends/): a callable with body's signature.
        self.body_runner = None
        # Mel frames per body call (None: a chunk in one call). A speed mode may bound them: the body's activations
        # grow with the chunk (hundreds of MB for a few seconds), and windows that overlap by `body_context` frames
        # on each side give the same output up to float rounding.
        self.body_window: Optional[int] = None
        self.body_context = _body_context(upsample_rates, upsample_kernel_sizes, resblock_kernel_sizes,
                                          resblock_dilation_sizes, source_resblock_kernel_sizes,
                                          source_resblock_dilation_sizes, [int(u) for u in down_rates])

    def predict_f0(self, mel: Tensor) -> Tensor:
        return self.f0_predictor(mel)  # (B, F) Hz

    def make_source(self, f0: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """f0 (B, F) -> excitation (B, 1, F * upsample_factor). Consumes the global torch RNG like the official code
        (or `generator`, for per-request randomness)."""
        f0 = F.interpolate(f0[:, None], scale_factor=float(self.upsample_factor), mode="nearest")  # (B, 1, T)
        return self.m_source(f0, generator)

    def _stft(self, x: Tensor) -> Tensor:
        spec = torch.stft(x, self.n_fft, self.hop_len, self.n_fft, window=self.stft_window, return_complex=True)
        spec = torch.view_as_real(spec)  # (B, n_fft//2+1, frames, 2)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)  # (B, n_fft+2, frames)

    def _istft(self, magnitude: Tensor, phase: Tensor) -> Tensor:
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, self.n_fft, self.hop_len, self.n_fft, window=self.stft_window)

    def decode(self, mel: Tensor, source: Tensor) -> Tensor:
        """mel (B, C, F), source (B, 1, F * upsample_factor) -> waveform (B, F * upsample_factor). Deterministic."""
        s_stft = self._stft(source.squeeze(1))  # (B, n_fft+2, F*upsample_factor/hop_len + 1)
        x = self._run_body(mel, s_stft)
        bins = self.n_fft // 2 + 1
        wav = self._istft(torch.exp(x[:, :bins, :]), torch.sin(x[:, bins:, :]))
        return torch.clamp(wav, -self.audio_limit, self.audio_limit)

    def _run_body(self, mel: Tensor, s_stft: Tensor) -> Tensor:
        """body(mel, s_stft), in windows of at most body_window frames when set: each window computes its frames
        with body_context frames more on each side (less at the chunk's edges) and keeps its own frames' columns."""
        body = self.body_runner or self.body
        frames, window, context = mel.size(2), self.body_window, self.body_context
        per_frame = self.upsample_factor // self.hop_len  # s_stft columns per mel frame; one more at the start
        if not window or frames <= window or s_stft.size(2) != frames * per_frame + 1:
            return body(mel, s_stft)
        if window <= 2 * context:
            raise ValueError(f"body_window {window} leaves no frames between its {context}-frame margins")
        n = -(-frames // (window - 2 * context))
        bounds = [round(i * frames / n) for i in range(n + 1)]
        parts = []
        for a, b in zip(bounds, bounds[1:]):
            lo, hi = max(0, a - context), min(frames, b + context)  # the frames this window computes
            out = body(mel[:, :, lo:hi], s_stft[:, :, lo * per_frame:hi * per_frame + 1])
            # output column c of the chunk is column c - lo * per_frame of the window; column 0 (the reflect-padded
            # one) belongs to the first window only
            first = 0 if a == 0 else a * per_frame + 1
            parts.append(out[:, :, first - lo * per_frame:(b - lo) * per_frame + 1])
        return torch.cat(parts, dim=2)

    def body(self, mel: Tensor, s_stft: Tensor) -> Tensor:
        """The convolutional generator between the two STFTs (almost all of HiFT's work): mel (B, C, F) and the
        source's STFT (B, n_fft+2, S) -> log-magnitude and phase pre-activations (B, n_fft+2, S)."""
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # one extra frame to match the STFT frame count
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs += block(x)
            x = xs / self.num_kernels
        return self.conv_post(F.leaky_relu(x))  # NB: default slope 0.01 here, as in the official model

    def forward(self, mel: Tensor, cache_source: Optional[Tensor] = None, generator: Optional[torch.Generator] = None):
        """Full inference: mel -> f0 -> source -> waveform. For streaming, `cache_source` (B, 1, S) (the tail of the
        previous chunk's source) overwrites the first S source samples to avoid a phase glitch at the boundary.
        Returns (wav (B, F * upsample_factor), source (B, 1, F * upsample_factor))."""
        source = self.make_source(self.predict_f0(mel), generator)
        if cache_source is not None and cache_source.shape[2] != 0:
            source[:, :, : cache_source.shape[2]] = cache_source
        return self.decode(mel, source), source
