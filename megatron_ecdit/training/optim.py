"""The learning-rate schedule and EMA weights. The optimizers themselves are the backends'
(`megatron_ecdit/parallel/backends/`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

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


SLICE = 1 << 20  # elements of a bf16 weight the EMA widens to fp32 at a time


class EMA:
    """Exponential moving average of a model's floating-point parameters, kept in fp32.

    It averages what `local(param)` returns: the parameter itself, or the part of it this rank
    stores when the optimizer backend partitions parameters (DeepSpeed ZeRO-3), so that the
    average is partitioned like the weights."""

    def __init__(self, model: nn.Module, decay: float,
                 local: Callable[[nn.Parameter], torch.Tensor] = lambda p: p):
        self.decay = decay
        self.local = local
        self.shadow = {name: local(p).detach().float().clone()
                       for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # One multi-tensor lerp over the fp32 weights (the same arithmetic as a lerp_ per
        # tensor). bf16 weights are widened in slices of 2^20 elements, so that the fp32
        # copies stay small and reuse memory: on a CPU 7x faster than whole-tensor copies of
        # XL's 42M-element expert weights (measured).
        pairs = [(self.shadow[name], self.local(p).detach())
                 for name, p in model.named_parameters()]
        same = [(average, w) for average, w in pairs if w.dtype == average.dtype]
        if same:
            torch._foreach_lerp_([a for a, _ in same], [w for _, w in same], 1.0 - self.decay)
        for average, w in pairs:
            if w.dtype != average.dtype:
                for a, part in zip(average.view(-1).split(SLICE), w.reshape(-1).split(SLICE)):
                    a.lerp_(part.float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the EMA weights inside, its own weights again after."""
        with torch.no_grad():
            params = [(self.local(p), self.shadow[name]) for name, p in model.named_parameters()]
            backup = [weights.clone() for weights, _ in params]
            for weights, average in params:
                weights.copy_(average.to(weights.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for (weights, _), saved in zip(params, backup):
                    weights.copy_(saved)
