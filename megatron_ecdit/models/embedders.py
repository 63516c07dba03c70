"""Embedders of the EC-DiT input: patches, timesteps and captions (DiT / PixArt-alpha).

All three are small and replicated: under pipeline parallelism every stage holds its own copy
of the conditioning embedders and their gradients are kept in sync by the parallel layer, not
here. Patch helpers convert between images (B, C, H, W) and token rows (B, S, p*p*C).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megatron_ecdit.layers.param_tags import (declare_init, declare_linear_init, xavier_uniform,
                                              zeros)


def patchify(x_BCHW: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = x_BCHW.shape
    x = x_BCHW.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x_BSP: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    B, S, _ = x_BSP.shape
    h = w = int(math.isqrt(S))
    x = x_BSP.reshape(B, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, h * p, w * p)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MAE / DiT), (grid*grid, dim)."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                         indexing="ij")
    emb = np.concatenate([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> hidden (a strided conv written as a linear layer)."""

    def __init__(self, in_channels: int, patch_size: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(patch_size * patch_size * in_channels, hidden_size)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        declare_init(self.proj.weight, xavier_uniform)
        declare_init(self.proj.bias, zeros)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x_BCHW, self.patch_size))  # (B, S, D)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features -> MLP (DiT). t is scaled by 1000 first."""

    def __init__(self, cond_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, cond_size), nn.SiLU(),
                                 nn.Linear(cond_size, cond_size))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
            declare_linear_init(layer, 0.02)

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t_B.device) / half)
        args = 1000.0 * t_B.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, Dc)


class CaptionProjection(nn.Module):
    """Text encoder width -> hidden (PixArt-alpha's caption projection)."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
            declare_linear_init(layer, 0.02)

    def forward(self, text_BLT: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(text_BLT), approximate="tanh"))  # (B, L, D)
