"""Rectified-flow training objective (SD3 convention: t = 0 is data, t = 1 is noise).

A training example is a straight line between data x0 and Gaussian noise:
``x_t = (1 - t) x0 + t noise``, whose velocity ``dx_t/dt = noise - x0`` is the regression
target. Timesteps are logit-normal, ``t = sigmoid(mean + std * N(0, 1))``, which puts more
weight on the middle of the path (SD3, Esser et al. 2024). The loss is the plain MSE between
predicted and target velocity.

What it deliberately doesn't do: loss weighting per timestep, timestep shifting for
resolution, token masking (MaskDiT) or any model call; those belong to the trainer, which
composes these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_timesteps(n: int, mean: float = 0.0, std: float = 1.0,
                     generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """``n`` logit-normal timesteps in (0, 1): ``sigmoid(mean + std * N(0, 1))``; float32 (n,).

    Drawn on ``device`` (default: the generator's device, else CPU) with ``generator``.
    """
    if std < 0:
        raise ValueError(f"logit-normal std must be >= 0, got {std}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)  # (n,)
    return torch.sigmoid(mean + std * z)


def add_noise(x0: Tensor, noise: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """Point on the straight path and its velocity: ``(x_t, target)``.

    x0, noise: (B, ...) data and Gaussian noise of the same shape.
    t: (B,) per-sample timesteps (or a scalar), broadcast over the trailing dims.
    Returns x_t = (1 - t) x0 + t noise and target = noise - x0, both (B, ...).
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    if t.ndim == 1:
        if t.shape[0] != x0.shape[0]:
            raise ValueError(f"t has {t.shape[0]} entries for a batch of {x0.shape[0]}")
        t = t.view(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)
    elif t.ndim != 0:
        raise ValueError(f"t must be a scalar or of shape (B,), got {tuple(t.shape)}")
    x_t = (1 - t) * x0 + t * noise
    return x_t, noise - x0


def flow_matching_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between predicted and target velocity (a scalar, float32)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return F.mse_loss(pred.float(), target.float())
