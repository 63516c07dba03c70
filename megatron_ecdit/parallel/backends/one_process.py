"""The one-process backend: a torch optimizer (AdamW, or the paper's RMSProp with momentum) with
global-norm gradient clipping, and the helper that creates an optimizer's state before its
first step (to save it, or to load a checkpoint into it).

With bf16 parameters (`train.precision: bf16`) it trains as megatron-core's mixed precision
does: every bf16 parameter has an fp32 main weight; its gradient is added into the main
weight's fp32 gradient as soon as backward produces it (so micro-batches accumulate in fp32),
clipping, the optimizer and its state see only the fp32 main weights, and the parameters are
set from them after each step (round to nearest).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                   optim_state_to_sharding_state)
from torch import nn

from megatron_ecdit.config import OptimConfig
from megatron_ecdit.parallel.backends import WholeParameters


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay applies to matrices only (not norms, biases, embedders' biases)."""
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def torch_optimizer(cfg: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """`cfg.name` over these parameter groups (each with its weight decay).

    `cfg.implementation` picks torch's per-tensor loop, its multi-tensor (foreach) kernels or,
    for AdamW, its fused kernel (CPU and CUDA; RMSprop has none and takes foreach); torch
    itself takes the loop for CPU tensors unless told otherwise. The fused kernel keeps the
    step count on the parameters' device and reads no scalar back to the host."""
    impl = cfg.implementation
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 foreach=impl == "foreach", fused=impl == "fused")
    # RMSProp with momentum, as the paper reports (lr 1e-4 there).
    return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps,
                               momentum=cfg.momentum, foreach=impl != "for_loop")


def state_names(cfg: OptimConfig) -> tuple[str, ...]:
    """The per-parameter state tensors of `cfg.name`'s torch optimizer (besides its step)."""
    if cfg.name == "adamw":
        return "exp_avg", "exp_avg_sq"
    return ("square_avg",) + (("momentum_buffer",) if cfg.momentum else ())


def format_suffix(cfg: OptimConfig) -> str:
    """What `cfg.name` adds to a backend's checkpoint format (AdamW's formats have none), so
    that optimizer state loads into the optimizer that saved it only."""
    return "" if cfg.name == "adamw" else f"-{cfg.name}"


def build_optimizer(cfg: OptimConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch_optimizer(cfg, param_groups(params, cfg.weight_decay))


class TorchOptimizer(WholeParameters):
    """One process: a torch optimizer with global-norm gradient clipping, over fp32 main
    weights where the parameters are bf16 (see the module's docstring)."""

    def __init__(self, model: nn.Module, cfg: OptimConfig):
        self.module = model
        self.modules = [model]
        params = [p for p in model.parameters() if p.requires_grad]
        # The optimizer's weight for each parameter: the parameter itself in fp32, else an fp32
        # main copy whose gradient buffer collects the parameter's gradients.
        self._written: set[nn.Parameter] = set()  # main gradients written since zero_grad
        self.main = {p: p if p.dtype == torch.float32 else self._main_weight(p) for p in params}
        self.copies = [(p, main) for p, main in self.main.items() if main is not p]
        self.optimizer = build_optimizer(cfg, list(self.main.values()))
        self.grad_clip = cfg.grad_clip
        self.checkpoint_format = "torch" + ("-bf16" if self.copies else "") + format_suffix(cfg)

    def _main_weight(self, param: nn.Parameter) -> nn.Parameter:
        """An fp32 copy of `param`. Its gradient buffer is kept from step to step (megatron's
        main_grad): the first gradient of a step is copied into it, later ones added."""
        main = nn.Parameter(param.detach().float())

        def accumulate(param: nn.Parameter) -> None:
            if main.grad is None:
                main.grad = param.grad.float()
            elif main in self._written:
                main.grad.add_(param.grad)
            else:
                main.grad.copy_(param.grad)
            self._written.add(main)
            param.grad = None

        param.register_post_accumulate_grad_hook(accumulate)
        return main

    def zero_grad(self) -> None:
        for param, main in self.main.items():
            if main is param:
                param.grad = None
        self._written.clear()  # the main gradient buffers are overwritten next

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """After a load: the main weights take the loaded parameters (a checkpoint of the same
        precision then restores their exact fp32 values with the optimizer state)."""
        for param, main in self.copies:
            main.copy_(param)

    def step(self, lr: float) -> float:
        norm = float(self.clip(lr))  # the step's one read: for the log, and the check
        if math.isfinite(norm):  # else skipped (training/nonfinite.py): nothing changes
            self.update()
        return norm

    def clip(self, lr: float) -> torch.Tensor:
        """Set the learning rate and clip; returns the gradient norm on the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for _, main in self.copies:  # no gradient this step: none for the optimizer
            if main not in self._written:
                main.grad = None
        return torch.nn.utils.clip_grad_norm_(list(self.main.values()), self.grad_clip)

    def update(self) -> None:
        """Update the main weights and set the parameters from them."""
        self.optimizer.step()
        if self.copies:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in self.copies], [m for _, m in self.copies])

    def sharded_state_dict(self, model_state: dict, is_loading: bool,
                           sharding: Optional[str] = None) -> dict:
        """The optimizer's moments (and the fp32 main weights, as `fp32_param`, megatron's
        name) as ShardedTensors shaped like the parameters (megatron-core's helpers for regular
        torch optimizers); the step count is restored from the checkpoint's step, as every
        parameter takes every step."""
        initialise_state(self.optimizer)  # before the first step there is none yet
        state = self.optimizer.state_dict()
        model_of = {id(main): p for p, main in self.main.items()}
        mains = [m for group in self.optimizer.param_groups for m in group["params"]]
        for index, main in enumerate(mains):
            if model_of[id(main)] is not main:  # a copy: a load must not write into it
                state["state"][index]["fp32_param"] = main.detach().clone()
        optim_state_to_sharding_state(
            state, get_param_id_to_sharded_param_map(model_state,
                                                     [model_of[id(m)] for m in mains]),
            exclude_keys=("step",))
        return state

    def load_state_dict(self, state: dict, step: int) -> None:
        mains = [m for group in self.optimizer.param_groups for m in group["params"]]
        with torch.no_grad():
            for index, param_state in state["state"].items():
                if "fp32_param" in param_state:
                    mains[index].copy_(param_state.pop("fp32_param"))
        for param_state in state["state"].values():
            param_state["step"] = torch.tensor(float(step))
        self.optimizer.load_state_dict(state)


@torch.no_grad()
def initialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Create a fresh optimizer's state tensors (to save them before the first step, or to load
    a checkpoint into) by a step of lr 0 on zero gradients, which leaves the parameters exactly
    unchanged and the moments zero; the step count is set back to 0, so the state is exactly
    the one the first real step would create. No-op if state exists (DeepSpeed may have
    created empty entries for its flat partitions)."""
    if all(optimizer.state.get(p) for group in optimizer.param_groups for p in group["params"]):
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
