"""Optimizers (AdamW, and the paper's RMSProp with momentum), the LR schedule, and EMA weights.

`TorchOptimizer` is the one-process backend; `parallel.zero` holds the data-parallel ones. All
offer `module`, `zero_grad()`, `backward(loss)` and `step(lr) -> grad norm`, so the training
loop never branches on the backend or the optimizer's name.
"""

from __future__ import annotations

import math

import torch
from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                   optim_state_to_sharding_state)
from torch import nn

from megatron_ecdit.config import OptimConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay applies to matrices only (not norms, biases, embedders' biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    # RMSProp with momentum, as the paper reports (lr 1e-4 there).
    return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps,
                               momentum=cfg.momentum)


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


class TorchOptimizer:
    """One process: a torch optimizer with global-norm gradient clipping."""

    checkpoint_format = "torch"

    def __init__(self, model: nn.Module, cfg: OptimConfig):
        self.module = model
        self.optimizer = build_optimizer(cfg, model)
        self.grad_clip = cfg.grad_clip

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reload_model_params(self) -> None:
        """Nothing to refresh after a load: the optimizer steps the parameters themselves."""

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        return float(norm)

    def sharded_state_dict(self, model_state: dict, is_loading: bool) -> dict:
        """The optimizer's moments as ShardedTensors shaped like the parameters (megatron-core's
        helpers for regular torch optimizers); the step count is restored from the checkpoint's
        step, as every parameter takes every step."""
        initialise_state(self.optimizer)  # before the first step there is none yet
        state = self.optimizer.state_dict()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        optim_state_to_sharding_state(
            state, get_param_id_to_sharded_param_map(model_state, params), exclude_keys=("step",))
        return state

    def load_state_dict(self, state: dict, step: int) -> None:
        for param_state in state["state"].values():
            param_state["step"] = torch.tensor(float(step))
        self.optimizer.load_state_dict(state)


@torch.no_grad()
def initialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Create a fresh optimizer's state tensors (to save them before the first step, or to load
    a checkpoint into) by a step of lr 0 on zero gradients, which leaves the parameters exactly
    unchanged and the moments zero; the step count is set back to 0, so the state is exactly
    the one the first real step would create. No-op if state exists."""
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0


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
