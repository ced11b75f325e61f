"""The flow-matching vector field estimator: a 1-D U-Net whose stages are ResNet blocks followed by transformer blocks.

Module and parameter names follow the official checkpoint (Matcha-TTS decoder + diffusers BasicTransformerBlock), so
`decoder.estimator.*` keys of flow.pt load strictly. Only what CosyVoice v1 configures is implemented: self-attention
without bias, GELU feed-forward, LayerNorm, no cross attention. Linear layers, convolutions and Mish come from the
precision policy the decoder is built with (``precision.py``; the official float32 layers by default).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .precision import EXACT, Precision


class SinusoidalPosEmb(nn.Module):
    """Timestep embedding: [sin(1000 t f), cos(1000 t f)] over `dim // 2` log-spaced frequencies."""

    def __init__(self, dim: int):
        super().__init__()
        assert dim % 2 == 0, "SinusoidalPosEmb needs an even dim"
        half = dim // 2
        step = math.log(10000) / (half - 1)
        # not persistent: the official module has no state, so flow.pt holds no key for it (explicit device: a
        # constant, also when the modules are built on the meta device)
        self.register_buffer("freqs", torch.exp(torch.arange(half, device="cpu").float() * -step), persistent=False)

    def forward(self, t: torch.Tensor, scale: float = 1000) -> torch.Tensor:
        if t.ndim < 1:
            t = t.unsqueeze(0)
        emb = scale * t.unsqueeze(1) * self.freqs.unsqueeze(0)  # (B, dim/2)
        return torch.cat((emb.sin(), emb.cos()), dim=-1)  # (B, dim)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int, policy: Precision = EXACT):
        super().__init__()
        self.linear_1 = policy.linear(in_channels, time_embed_dim, name="linear_1")
        self.act = nn.SiLU()
        self.linear_2 = policy.linear(time_embed_dim, time_embed_dim, name="linear_2")

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(t)))


class Block1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int = 8, policy: Precision = EXACT):
        super().__init__()
        self.block = nn.Sequential(policy.conv1d(dim, dim_out, 3, padding=1, name="block.0"),
                                   nn.GroupNorm(groups, dim_out), policy.mish(name="block.2"))

    def forward(self, x: torch.Tensor, mask) -> torch.Tensor:
        return masked(self.block(masked(x, mask)), mask)


class ResnetBlock1D(nn.Module):
    """Two conv blocks with the timestep embedding added in between, plus a 1x1 residual projection."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8, policy: Precision = EXACT):
        super().__init__()
        self.mlp = nn.Sequential(policy.mish(name="mlp.0"), policy.linear(time_emb_dim, dim_out, name="mlp.1"))
        self.block1 = Block1D(dim, dim_out, groups=groups, policy=policy.at("block1"))
        self.block2 = Block1D(dim_out, dim_out, groups=groups, policy=policy.at("block2"))
        self.res_conv = policy.conv1d(dim, dim_out, 1, name="res_conv")

    def forward(self, x: torch.Tensor, mask, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask)  # (B, C_out, T)
        h += self.mlp(t_emb).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(masked(x, mask))


class Downsample1D(nn.Module):
    def __init__(self, dim: int, policy: Precision = EXACT):
        super().__init__()
        self.conv = policy.conv1d(dim, dim, 3, 2, 1, name="conv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    """x2 upsampling by transposed convolution (the only variant the estimator uses)."""

    def __init__(self, channels: int, policy: Precision = EXACT):
        super().__init__()
        self.conv = policy.conv_transpose1d(channels, channels, 4, 2, 1, name="conv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head self-attention with bias-free q/k/v projections (diffusers layout: to_q, to_k, to_v, to_out.0)."""

    def __init__(self, dim: int, heads: int, dim_head: int, policy: Precision = EXACT):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = policy.linear(dim, inner, bias=False, name="to_q")
        self.to_k = policy.linear(dim, inner, bias=False, name="to_k")
        self.to_v = policy.linear(dim, inner, bias=False, name="to_v")
        self.to_out = nn.ModuleList([policy.linear(inner, dim, name="to_out.0")])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, D)
        k = self.to_k(x).view(B, T, self.heads, -1).transpose(1, 2)
        v = self.to_v(x).view(B, T, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.to_out[0](out)


class GELU(nn.Module):
    """Linear projection followed by exact (erf) GELU."""

    def __init__(self, dim_in: int, dim_out: int, policy: Precision = EXACT):
        super().__init__()
        self.proj = policy.linear(dim_in, dim_out, name="proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, activation_fn: str = "gelu", policy: Precision = EXACT):
        super().__init__()
        if activation_fn != "gelu":
            raise ValueError(f"unsupported estimator act_fn {activation_fn!r} (only 'gelu' is implemented)")
        inner = dim * mult
        # index 1 is the official dropout slot; kept as Identity so that the output layer stays `net.2`
        self.net = nn.ModuleList([GELU(dim, inner, policy.at("net.0")), nn.Identity(),
                                  policy.linear(inner, dim, name="net.2")])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention and feed-forward, each with a residual connection."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, activation_fn: str = "gelu",
                 policy: Precision = EXACT):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_attention_heads, attention_head_dim, policy.at("attn1"))
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn=activation_fn, policy=policy.at("ff"))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x), bias) + x  # (B, T, C)
        x = self.ff(self.norm3(x)) + x
        return x


def masked(x: torch.Tensor, mask):
    """x * mask; mask None means every frame is valid (multiplying by ones changes no bit, so it is skipped)."""
    return x if mask is None else x * mask


def attention_bias(mask):
    """(B, 1, T) float frame mask -> (B, 1, 1, T) additive key bias: 0 where a frame is valid, -1e10 where padded.

    The official code materialises this per head and query row (B, H, T, T); broadcasting gives the same sums.
    None (no padding) -> None: adding zeros changes no score, and attention runs faster without a mask.
    """
    if mask is None:
        return None
    keep = mask.bool().to(mask.dtype)
    return ((1.0 - keep) * -1.0e10).unsqueeze(1)


class ConditionalDecoder(nn.Module):
    """U-Net over time: down stages (x2 decimation between them), mid stages, up stages with skip connections.

    Input channels are [x, mu, spks broadcast over time, cond] concatenated (= in_channels); output is the velocity.
    """

    def __init__(self, in_channels: int, out_channels: int, channels=(256, 256), dropout: float = 0.0,
                 attention_head_dim: int = 64, n_blocks: int = 1, num_mid_blocks: int = 2, num_heads: int = 4,
                 act_fn: str = "gelu", policy: Precision = EXACT):
        super().__init__()
        channels = tuple(channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = num_heads
        time_embed_dim = channels[0] * 4
        self.time_embeddings = SinusoidalPosEmb(in_channels)
        self.time_mlp = TimestepEmbedding(in_channels, time_embed_dim, policy.at("time_mlp"))

        def transformers(dim, at: Precision):
            return nn.ModuleList([BasicTransformerBlock(dim, num_heads, attention_head_dim, act_fn, at.at(j))
                                  for j in range(n_blocks)])

        # a stage is [resnet, transformers, down/up sampling] at <blocks>.<stage>.{0,1,2}
        self.down_blocks = nn.ModuleList()
        dim_out = in_channels
        for i, ch in enumerate(channels):
            stage = policy.at(f"down_blocks.{i}")
            dim_in, dim_out = dim_out, ch
            last = i == len(channels) - 1
            down = (stage.conv1d(dim_out, dim_out, 3, padding=1, name="2") if last
                    else Downsample1D(dim_out, stage.at("2")))
            self.down_blocks.append(nn.ModuleList([ResnetBlock1D(dim_in, dim_out, time_embed_dim, policy=stage.at("0")),
                                                   transformers(dim_out, stage.at("1")), down]))

        self.mid_blocks = nn.ModuleList([
            nn.ModuleList([ResnetBlock1D(channels[-1], channels[-1], time_embed_dim,
                                         policy=policy.at(f"mid_blocks.{i}.0")),
                           transformers(channels[-1], policy.at(f"mid_blocks.{i}.1"))])
            for i in range(num_mid_blocks)
        ])

        up_channels = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(up_channels) - 1):
            stage = policy.at(f"up_blocks.{i}")
            dim_in, dim_out = up_channels[i] * 2, up_channels[i + 1]  # *2: skip connection concatenated
            last = i == len(up_channels) - 2
            up = stage.conv1d(dim_out, dim_out, 3, padding=1, name="2") if last else Upsample1D(dim_out, stage.at("2"))
            self.up_blocks.append(nn.ModuleList([ResnetBlock1D(dim_in, dim_out, time_embed_dim, policy=stage.at("0")),
                                                 transformers(dim_out, stage.at("1")), up]))

        self.final_block = Block1D(up_channels[-1], up_channels[-1], policy=policy.at("final_block"))
        self.final_proj = policy.conv1d(up_channels[-1], out_channels, 1, name="final_proj")

    def _transformers(self, blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T) whose memory is time-major (B, T, C): the convolutions after it take either layout
        (time-major ones, see layers.TimeMajorConv1d, without a copy), and a time-major input needs no copy here."""
        bias = attention_bias(mask)
        x = x.transpose(1, 2).contiguous()  # (B, T, C)
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2)  # (B, C, T), memory (B, T, C)

    def forward(self, x, mask, mu, t, spks=None, cond=None):
        """x, mu, cond: (B, 80, T); mask: (B, 1, T); t: (B,); spks: (B, 80) -> velocity (B, out_channels, T)."""
        return self.body(x, mask, mu, self.embed_time(t), spks, cond)

    def embed_time(self, t):
        """(B,) flow time -> (B, 4*channels[0]). Kept apart from `body`: sin(1000 t f) needs float32 arguments, so
        a reduced-precision execution of the body (backends/) leaves this part in float32."""
        return self.time_mlp(self.time_embeddings(t).to(t.dtype))

    def body(self, x, mask, mu, t, spks=None, cond=None):
        """forward with the time already embedded: t (B, 4*channels[0])."""
        parts = [x, mu]
        if spks is not None:
            parts.append(spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if cond is not None:
            parts.append(cond)
        x = torch.cat(parts, dim=1)  # (B, in_channels, T)

        skips = []
        full = bool((mask == 1).all())  # no padding: every mask below is all ones and can be skipped
        masks = [None if full else mask]
        for resnet, blocks, down in self.down_blocks:
            mask_down = masks[-1]
            x = resnet(x, mask_down, t)
            x = self._transformers(blocks, x, mask_down)
            skips.append(x)
            x = down(masked(x, mask_down))
            masks.append(None if full else mask_down[:, :, ::2])
        masks = masks[:-1]
        mask_mid = masks[-1]

        for resnet, blocks in self.mid_blocks:
            x = resnet(x, mask_mid, t)
            x = self._transformers(blocks, x, mask_mid)

        for resnet, blocks, up in self.up_blocks:
            mask_up = masks.pop()
            skip = skips.pop()
            x = torch.cat([x[:, :, :skip.shape[-1]], skip], dim=1)  # transposed conv may overshoot by one frame
            x = resnet(x, mask_up, t)
            x = self._transformers(blocks, x, mask_up)
            x = up(masked(x, mask_up))

        x = self.final_block(x, mask_up)
        return masked(self.final_proj(masked(x, mask_up)), None if full else mask)
