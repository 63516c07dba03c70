"""Optimizer backends: one interface, three implementations, one place that chooses.

  one_process.TorchOptimizer   one process: a torch optimizer with gradient clipping
  megatron_ddp.MegatronZeRO    megatron-core DDP + distributed optimizer (ZeRO-1), any TP/PP/EP
  deepspeed_zero.DeepSpeedZeRO DeepSpeed ZeRO-1/2/3 with megatron-core's groups
  inference.NoOptimizer        no optimizer at all: a job that only samples or converts

`build_backend` picks one from the validated layout; every combination a backend cannot run is
refused earlier, by `ParallelLayout.build`, so nothing here refuses anything. The training loop
and the checkpoints see only `OptimizerBackend`.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Protocol

import torch
from torch import nn

from megatron_ecdit.config import Config
from megatron_ecdit.layers.tensor_parallel import ParallelContext
from megatron_ecdit.parallel.layout import ParallelLayout


class OptimizerBackend(Protocol):
    """What the training loop and checkpoints call; the backend owns gradient reduction over
    its groups, clipping, and whatever copies of the weights it keeps."""

    checkpoint_format: str  # its optimizer-state format: state loads into the same format only
    # What else a checkpoint's optimizer state needs to match when it was saved in a form tied
    # to the buffers (megatron's dp_reshardable); None where the state is in model space.
    optimizer_layout: Optional[str]
    module: nn.Module  # what the loop calls forward on (a wrapper, or the model itself)
    modules: list[nn.Module]  # every wrapped model chunk (virtual pipelining has several)

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float) -> float:
        """Reduce, clip and update at learning rate `lr`; returns the global gradient norm.
        A norm that is not finite (alike on every rank) means the update was skipped: weights
        and optimizer state are as they were (training/nonfinite.py)."""

    def reload_model_params(self) -> None:
        """The parameters were overwritten (a load): refresh every copy of them the backend
        keeps (fp32 partitions, main parameters), so that the next step starts from them."""

    def sharded_state_dict(self, model_state: dict, is_loading: bool,
                           sharding: Optional[str] = None) -> dict:
        """Its optimizer state as dist_checkpointing tensors: in model space, or (megatron's
        distributed optimizer with `sharding="dp_reshardable"`) each rank's own buffers."""

    def load_state_dict(self, state: dict, step: int) -> None: ...

    # Where the weights live. Every backend but DeepSpeed ZeRO-3 keeps each parameter whole on
    # its ranks (`WholeParameters`); ZeRO-3 keeps a flat partition of it per data-parallel rank.

    def gathered(self, modify: bool = False) -> ContextManager[None]:
        """Every parameter whole inside (ZeRO-3 gathers its partitions). With `modify`, values
        written inside are kept (ZeRO-3 partitions them again on exit)."""

    def local(self, param: nn.Parameter) -> torch.Tensor:
        """What this rank stores of `param` and the optimizer updates: the parameter itself, or
        its ZeRO-3 partition (what the EMA averages)."""

    def to_full(self, param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor of a value stored like `local(param)` (collective under ZeRO-3)."""

    def to_local(self, param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole tensor shaped like `param`, stored like `local(param)`."""


class WholeParameters:
    """The weight placement of the backends that keep every parameter whole on its ranks."""

    optimizer_layout: Optional[str] = None  # optimizer state in model space (full tensors)

    def gathered(self, modify: bool = False) -> ContextManager[None]:
        return contextlib.nullcontext()

    def local(self, param: nn.Parameter) -> torch.Tensor:
        return param

    def to_full(self, param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        return local

    def to_local(self, param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        return full


def build_backend(layout: ParallelLayout, chunks: list[nn.Module], cfg: Config,
                  ctx: ParallelContext, train: bool = True) -> OptimizerBackend:
    """The backend `layout` asks for, over this rank's model chunks (`train=False`: none)."""
    if not train:
        from megatron_ecdit.parallel.backends.inference import NoOptimizer
        from megatron_ecdit.parallel.backends.megatron_ddp import transformer_config
        if layout.pp == 1:
            return NoOptimizer(chunks)
        dtype = next(chunks[0].parameters()).dtype  # what the schedules send between stages
        return NoOptimizer(chunks, transformer_config(cfg.model, cfg.moe, ctx, layout, dtype))
    if layout.world_size == 1:
        from megatron_ecdit.parallel.backends.one_process import TorchOptimizer
        return TorchOptimizer(chunks[0], cfg.optim)
    if layout.zero == "deepspeed":
        from megatron_ecdit.parallel.backends.deepspeed_zero import DeepSpeedZeRO
        return DeepSpeedZeRO(chunks[0], cfg.optim, layout, cfg.train.micro_batch_size,
                             cfg.train.num_microbatches)
    from megatron_ecdit.parallel.backends.megatron_ddp import MegatronZeRO
    return MegatronZeRO(chunks, cfg.model, cfg.moe, cfg.optim, ctx, layout,
                        cfg.train.num_microbatches)
