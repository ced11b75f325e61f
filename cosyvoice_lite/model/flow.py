"""Speech tokens -> mel: token embedding, Conformer encoder, length regulation to mel frames, flow-matching decoder.

CosyVoice v1 (MaskedDiffWithXvec). With a prompt (a cloned voice, or the target voice of a conversion) the prompt's
speech tokens are encoded before the new ones and its mel is the decoder's `cond` over the prompt frames: the flow
continues the prompt and its frames are cut from the output. Without one (SFT, instruct) `cond` is all zeros.
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
                  hop: int = 256, n_prompt: int = 0, prompt_frames: int = 0) -> torch.Tensor:
        """h (B, n_prompt + T, C) -> mu (B, C_out, prompt_frames + n_frames).

        The first n_prompt rows (prompt tokens) are stretched to prompt_frames in one piece, the T new ones on
        their own, so that the frame where the new speech starts is fixed by the prompt mel's length."""
        x = h.transpose(1, 2).contiguous()  # (B, C, n_prompt + T)
        prompt, x = x[:, :, :n_prompt], x[:, :, n_prompt:]
        if x.shape[2] > 2 * EDGE_TOKENS:
            edge = n_mel_frames(EDGE_TOKENS, input_frame_rate, sample_rate, hop)
            x = torch.cat([
                F.interpolate(x[:, :, :EDGE_TOKENS].contiguous(), size=edge, mode="linear"),
                F.interpolate(x[:, :, EDGE_TOKENS:-EDGE_TOKENS].contiguous(), size=n_frames - 2 * edge, mode="linear"),
                F.interpolate(x[:, :, -EDGE_TOKENS:].contiguous(), size=edge, mode="linear"),
            ], dim=2)
        else:
            x = F.interpolate(x.contiguous(), size=n_frames, mode="linear")
        if n_prompt:
            x = torch.cat([F.interpolate(prompt.contiguous(), size=prompt_frames, mode="linear"), x], dim=2)
        return self.model(x)  # (B, C_out, prompt_frames + n_frames)


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

    def encode(self, token: torch.Tensor, prompt_token: torch.Tensor = None, prompt_frames: int = 0) -> torch.Tensor:
        """token (1, T) -> mu (1, output_size, prompt_frames + F) at the mel frame rate; prompt_token (1, Np)
        (stretched to prompt_frames) is encoded before the new tokens."""
        assert token.shape[0] == 1, "batch size 1 only (no padding masks)"
        T = token.shape[1]
        n_prompt = 0 if prompt_token is None else prompt_token.shape[1]
        if n_prompt:
            if prompt_frames <= 0:
                raise ValueError("prompt tokens need a prompt mel of at least one frame")
            token = torch.cat([prompt_token.reshape(1, -1).to(token), token], dim=1)
        x = self.input_embedding(torch.clamp(token, min=0).long())  # (1, Np + T, input_size)
        h, _ = self.encoder(x, torch.tensor([n_prompt + T], dtype=torch.int32, device=token.device))  # (1, Np + T, D)
        h = self.encoder_proj(h)  # (1, Np + T, 80)
        return self.length_regulator.inference(h, self.n_frames(T), self.input_frame_rate, self.sample_rate,
                                               self.hop_size, n_prompt=n_prompt,
                                               prompt_frames=prompt_frames if n_prompt else 0)

    @staticmethod
    def prompt_cond(prompt_feat: torch.Tensor, n_frames: int) -> torch.Tensor:
        """The decoder's cond (B, 80, n_frames): the prompt mel (B, Fp, 80) in its first Fp frames, zeros after."""
        cond = prompt_feat.new_zeros(prompt_feat.shape[0], prompt_feat.shape[2], n_frames)
        cond[:, :, :prompt_feat.shape[1]] = prompt_feat.transpose(1, 2)
        return cond

    def solve(self, mu: torch.Tensor, spks: torch.Tensor, z: torch.Tensor, n_timesteps: int = 10,
              caches=None, keep=0, on_step=None, cond: torch.Tensor = None, prompt_frames: int = 0):
        """Integrate from noise z (B, 80, Fp + F) to the mel, conditioned on mu (B, 80, Fp + F), spks (B, 80) and
        cond (B, 80, Fp + F) (the prompt mel then zeros; None: all zeros); returns the mel without its first
        prompt_frames frames (B, 80, F).

        Chunked (streaming) inference, the official v1 flow cache: ``caches[i]`` (1, 80, n, 2) holds the noise and
        mu of the previous chunk's prompt frames and last frames of row i, which replace row i's first n frames (so
        the prompt and the overlap are integrated from the same start); with ``keep`` frames (one number, or one
        per row) the call returns (mel, the new caches: prompt frames + last keep frames) instead of the mel.
        ``on_step(step)`` runs after every Euler step (it may raise to stop)."""
        if caches is not None:
            z, mu = z.clone(), mu.clone()
            for i, cache in enumerate(caches):
                n = cache.shape[2]
                if n:
                    z[i, :, :n], mu[i, :, :n] = cache[0, :, :, 0], cache[0, :, :, 1]
        keeps = [keep] * z.shape[0] if isinstance(keep, int) else list(keep)
        T, P = z.shape[2], prompt_frames
        kept = [torch.stack([torch.cat([z[i:i + 1, :, :P], z[i:i + 1, :, T - k:]], dim=2),
                             torch.cat([mu[i:i + 1, :, :P], mu[i:i + 1, :, T - k:]], dim=2)], dim=-1)
                for i, k in enumerate(keeps)] if any(keeps) else None
        mask = mu.new_ones(1, 1, mu.shape[2])
        if cond is None:
            cond = torch.zeros_like(mu)
        t_span = self.decoder.t_span(n_timesteps, dtype=mu.dtype, device=mu.device)
        mel = self.decoder.solve_euler(z, t_span, mu, mask, spks, cond, on_step=on_step)[:, :, P:]
        return mel if kept is None else (mel, kept)

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, embedding: torch.Tensor, n_timesteps: int = 10,
                  noise: torch.Tensor = None, prompt_token: torch.Tensor = None,
                  prompt_feat: torch.Tensor = None) -> torch.Tensor:
        """token (1, T), embedding (1, spk_embed_dim) -> mel (1, 80, F).

        With a prompt, prompt_token (1, Np) and prompt_feat (1, Fp, 80): mu and the noise span Fp + F frames and
        the prompt's Fp are cut from the result. Without `noise` the start noise is torch.randn_like(mu) (prompt
        frames included), drawn after the encoder as in the official code, so a run seeded by the caller
        reproduces the official one.
        """
        n_prompt = 0 if prompt_token is None else prompt_token.shape[1]
        if n_prompt and prompt_feat is None:
            raise ValueError("prompt tokens without a prompt mel")
        prompt_frames = prompt_feat.shape[1] if n_prompt else 0
        spks = self.project_speaker(embedding)
        mu = self.encode(token, prompt_token, prompt_frames)  # (1, 80, Fp + F)
        z = torch.randn_like(mu) if noise is None else noise
        cond = self.prompt_cond(prompt_feat.to(mu), mu.shape[2]) if prompt_frames else None
        return self.solve(mu, spks, z, n_timesteps, cond=cond, prompt_frames=prompt_frames)
