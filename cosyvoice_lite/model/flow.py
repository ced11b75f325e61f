"""Speech tokens -> mel: token embedding, Conformer encoder, length regulation to mel frames, flow-matching decoder.

CosyVoice v1 (MaskedDiffWithXvec), SFT path: no prompt tokens or prompt mel, so the decoder's `cond` is all zeros.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .precision import EXACT, Precision

# Tokens at each end of a long utterance are stretched on their own (official token_overlap_len), so that the mel
# frames belonging to the first/last 20 tokens do not depend on the utterance length.
EDGE_TOKENS = 20


def n_mel_frames(n_tokens: int, input_frame_rate: int, sample_rate: int, hop: int) -> int:
    """Mel frames for `n_tokens` speech tokens, computed in the same float order as the official code."""
    return int(n_tokens / input_frame_rate * sample_rate / hop)


class InterpolateRegulator(nn.Module):
    """Linearly stretches token features (B, T, C) to the mel frame rate, then smooths them with a conv stack."""

    def __init__(self, channels: int, sampling_ratios=(1, 1, 1, 1), out_channels: int = None, groups: int = 1,
                 policy: Precision = EXACT):
        super().__init__()
        self.sampling_ratios = sampling_ratios
        layers = []
        for _ in sampling_ratios:
            i = len(layers)  # names model.<i> as in the official
            layers += [policy.conv1d(channels, channels, 3, 1, 1, name=f"model.{i}"), nn.GroupNorm(groups, channels),
                       policy.mish(name=f"model.{i + 2}")]
        layers.append(policy.conv1d(channels, out_channels or channels, 1, 1, name=f"model.{len(layers)}"))
        self.model = nn.Sequential(*layers)

    def inference(self, h: torch.Tensor, n_frames: int, input_frame_rate: int = 50, sample_rate: int = 22050,
                  hop: int = 256) -> torch.Tensor:
        """h (B, T, C) -> mu (B, C_out, n_frames)."""
        x = h.transpose(1, 2).contiguous()  # (B, C, T)
        if x.shape[2] > 2 * EDGE_TOKENS:
            edge = n_mel_frames(EDGE_TOKENS, input_frame_rate, sample_rate, hop)
            x = torch.cat([
                F.interpolate(x[:, :, :EDGE_TOKENS].contiguous(), size=edge, mode="linear"),
                F.interpolate(x[:, :, EDGE_TOKENS:-EDGE_TOKENS].contiguous(), size=n_frames - 2 * edge, mode="linear"),
                F.interpolate(x[:, :, -EDGE_TOKENS:].contiguous(), size=edge, mode="linear"),
            ], dim=2)
        else:
            x = F.interpolate(x, size=n_frames, mode="linear")
        return self.model(x)  # (B, C_out, n_frames)


def stretch(mel: torch.Tensor, speed: float) -> torch.Tensor:
    """The official tempo change: the mel (B, 80, F) stretched in time to F / speed frames before the vocoder."""
    if speed == 1.0:
        return mel
    return F.interpolate(mel, size=max(1, int(mel.shape[2] / speed)), mode="linear")


class MaskedDiffWithXvec(nn.Module):
    def __init__(self, input_size: int = 512, output_size: int = 80, spk_embed_dim: int = 192,
                 output_type: str = "mel", vocab_size: int = 4096, input_frame_rate: int = 50,
                 encoder: nn.Module = None, length_regulator: nn.Module = None, decoder: nn.Module = None,
                 sample_rate: int = 22050, hop_size: int = 256, policy: Precision = EXACT):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.output_type = output_type
        self.vocab_size = vocab_size
        self.input_frame_rate = input_frame_rate
        self.sample_rate = sample_rate
        self.hop_size = hop_size
        self.input_embedding = policy.embedding(vocab_size, input_size, name="input_embedding")
        self.spk_embed_affine_layer = policy.linear(spk_embed_dim, output_size, name="spk_embed_affine_layer")
        self.encoder = encoder
        enc_size = encoder.output_size() if callable(encoder.output_size) else encoder.output_size
        self.encoder_proj = policy.linear(enc_size, output_size, name="encoder_proj")
        self.decoder = decoder
        self.length_regulator = length_regulator

    def n_frames(self, n_tokens: int) -> int:
        return n_mel_frames(n_tokens, self.input_frame_rate, self.sample_rate, self.hop_size)

    def project_speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """(1, spk_embed_dim) x-vector -> (1, output_size) decoder speaker condition."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def encode(self, token: torch.Tensor) -> torch.Tensor:
        """token (1, T) -> mu (1, output_size, F) at the mel frame rate."""
        assert token.shape[0] == 1, "batch size 1 only (no padding masks)"
        T = token.shape[1]
        x = self.input_embedding(torch.clamp(token, min=0).long())  # (1, T, input_size)
        h, _ = self.encoder(x, torch.tensor([T], dtype=torch.int32, device=token.device))  # (1, T, D)
        h = self.encoder_proj(h)  # (1, T, 80)
        return self.length_regulator.inference(h, self.n_frames(T), self.input_frame_rate, self.sample_rate,
                                               self.hop_size)  # (1, 80, F)

    def solve(self, mu: torch.Tensor, spks: torch.Tensor, z: torch.Tensor, n_timesteps: int = 10,
              caches=None, keep=0, on_step=None):
        """Integrate from noise z (B, 80, F) to the mel (B, 80, F), conditioned on mu (B, 80, F) and spks (B, 80).

        Chunked (streaming) inference, the official v1 flow cache: ``caches[i]`` (1, 80, n, 2) holds the noise and
        mu of the previous chunk's last n frames of row i, which replace row i's first n frames (so the overlap
        is integrated from the same start); with ``keep`` frames (one number, or one per row) the call returns
        (mel, the new caches) instead of the mel. ``on_step(step)`` runs after every Euler step (it may raise to
        stop)."""
        if caches is not None:
            z, mu = z.clone(), mu.clone()
            for i, cache in enumerate(caches):
                n = cache.shape[2]
                if n:
                    z[i, :, :n], mu[i, :, :n] = cache[0, :, :, 0], cache[0, :, :, 1]
        keeps = [keep] * z.shape[0] if isinstance(keep, int) else list(keep)
        kept = [torch.stack([z[i:i + 1, :, z.shape[2] - k:], mu[i:i + 1, :, z.shape[2] - k:]], dim=-1)
                for i, k in enumerate(keeps)] if any(keeps) else None
        mask = mu.new_ones(1, 1, mu.shape[2])
        cond = torch.zeros_like(mu)  # SFT: no prompt mel
        t_span = self.decoder.t_span(n_timesteps, dtype=mu.dtype, device=mu.device)
        mel = self.decoder.solve_euler(z, t_span, mu, mask, spks, cond, on_step=on_step)
        return mel if kept is None else (mel, kept)

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, embedding: torch.Tensor, n_timesteps: int = 10,
                  noise: torch.Tensor = None) -> torch.Tensor:
        """token (1, T), embedding (1, spk_embed_dim) -> mel (1, 80, F).

        Without `noise` the start noise is torch.randn_like(mu), drawn after the encoder as in the official code,
        so a run seeded by the caller reproduces the official one.
        """
        spks = self.project_speaker(embedding)
        mu = self.encode(token)
        z = torch.randn_like(mu) if noise is None else noise
        return self.solve(mu, spks, z, n_timesteps)
