"""The learning-rate schedule and EMA weights. The optimizers themselves are the backends'
(`megatron_ecdit/parallel/backends/`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_ecdit.config import OptimConfig


def lr_factor(cfg: OptimConfig, total_steps: int, step: int) -> float:
    """Linear warm-up to 1, then constant or cosine decay to min_lr / lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def learning_rate(cfg: OptimConfig, total_steps: int, step: int) -> float:
    return cfg.lr * lr_factor(cfg, total_steps, step)


class EMA:
    """Exponential moving average of a model's floating-point parameters, kept in fp32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
