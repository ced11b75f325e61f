"""Conditional flow matching sampler: integrates the estimator's velocity field from noise to mel with Euler steps.

Classifier-free guidance runs the estimator on a batch of two (row 0 conditional, row 1 with mu/spks/cond zeroed) and
extrapolates: v = (1 + w) v_cond - w v_uncond.
"""
import math

import torch
from torch import nn


class ConditionalCFM(nn.Module):
    def __init__(self, in_channels: int, cfm_params: dict, n_spks: int = 1, spk_emb_dim: int = 64,
                 estimator: nn.Module = None):
        super().__init__()
        params = dict(cfm_params.get("content", cfm_params))  # tolerate an unwrapped omegaconf `content:` mapping
        self.n_feats = in_channels
        self.n_spks = n_spks
        self.spk_emb_dim = spk_emb_dim
        self.solver = params.get("solver", "euler")
        self.sigma_min = params.get("sigma_min", 1e-4)
        self.t_scheduler = params.get("t_scheduler", "linear")
        self.inference_cfg_rate = params.get("inference_cfg_rate", 0.7)
        if self.solver != "euler":
            raise ValueError(f"unsupported CFM solver {self.solver!r} (only 'euler')")
        self.estimator = estimator

    def t_span(self, n_timesteps: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """(n_timesteps + 1,) time grid from 0 to 1; 'cosine' packs steps densely near t = 0."""
        t = torch.linspace(0, 1, n_timesteps + 1, dtype=dtype, device=device)
        if self.t_scheduler == "cosine":
            t = 1 - torch.cos(t * 0.5 * math.pi)
        return t

    @torch.inference_mode()
    def forward(self, mu, mask, n_timesteps: int, temperature: float = 1.0, spks=None, cond=None, z=None,
                cache=None, prompt_len: int = 0, overlap: int = 34):
        """Sample a mel for `mu` (B, 80, F). Returns (mel (B, 80, F), cache).

        z is drawn as torch.randn_like(mu) * temperature unless given. `cache` (1, 80, n, 2) carries [z, mu] of the
        previous chunk's last `overlap` frames for streaming: they replace the first n frames of z and mu so that
        overlapping chunks start from the same noise. The returned cache holds the prompt frames and the last
        `overlap` frames of this call.
        """
        if z is None:
            z = torch.randn_like(mu) * temperature
        if cache is not None and cache.shape[2] != 0:
            n = cache.shape[2]
            z = z.clone()
            mu = mu.clone()
            z[:, :, :n] = cache[:, :, :, 0]
            mu[:, :, :n] = cache[:, :, :, 1]
        z_keep = torch.cat([z[:, :, :prompt_len], z[:, :, -overlap:]], dim=2)
        mu_keep = torch.cat([mu[:, :, :prompt_len], mu[:, :, -overlap:]], dim=2)
        new_cache = torch.stack([z_keep, mu_keep], dim=-1)

        t_span = self.t_span(n_timesteps, dtype=mu.dtype, device=mu.device)
        return self.solve_euler(z, t_span, mu, mask, spks, cond), new_cache

    def solve_euler(self, x, t_span, mu, mask, spks, cond=None, on_step=None):
        """Fixed-step Euler from x = z at t_span[0] to t_span[-1]; x, mu, cond: (B, 80, F), mask (1, 1, F), spks (B, 80).

        on_step(step) is called after every step (streaming uses it to stop a cancelled request early).
        """
        B, C, T = x.shape
        # the estimator batch: rows [0, B) conditional, rows [B, 2B) unconditional (mu, spks, cond stay zero)
        x_in = x.new_zeros(2 * B, C, T)
        mask_in = mask.new_zeros(2 * B, 1, T)
        mu_in = mu.new_zeros(2 * B, C, T)
        t_in = x.new_zeros(2 * B)
        spks_in = spks.new_zeros(2 * B, spks.shape[1])
        cond_in = mu.new_zeros(2 * B, C, T)
        mask_in[:] = mask
        mu_in[:B] = mu
        spks_in[:B] = spks
        if cond is not None:
            cond_in[:B] = cond

        w = self.inference_cfg_rate
        t, dt = t_span[0], t_span[1] - t_span[0]
        n_steps = len(t_span) - 1
        for step in range(1, n_steps + 1):
            x_in[:B] = x
            x_in[B:] = x
            t_in[:] = t
            v = self.estimator(x_in, mask_in, mu_in, t_in, spks_in, cond_in)  # (2B, 80, F)
            v_cond, v_uncond = v[:B], v[B:]
            v = (1.0 + w) * v_cond - w * v_uncond
            x = x + dt * v
            t = t + dt
            if on_step is not None:
                on_step(step)
            if step < n_steps:
                dt = t_span[step + 1] - t
        return x.float()
