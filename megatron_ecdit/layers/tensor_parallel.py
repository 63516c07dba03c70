"""The parallel context a model is built with, and megatron-core linear-layer factories.

Models never look up process groups: the parent builds one `ParallelContext` (from
`megatron_ecdit.parallel`) and pushes it down. In one process every group has size one and
megatron-core's ColumnParallel/RowParallel layers reduce to plain linear layers, so the same
model code runs unchanged from a laptop to TP x PP x EP.

Layers take and return sequence-first tensors (S, B, D), megatron's convention; with sequence
parallelism S is the local shard of the sequence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import nn

from megatron_ecdit.layers.param_tags import declare_linear_init

INIT_STD = 0.02


def _normal_init(std: float):
    return lambda tensor: nn.init.normal_(tensor, mean=0.0, std=std)


@dataclass
class ParallelContext:
    """Process groups (None outside torch.distributed) and megatron's layer config."""

    mp_config: ModelParallelConfig = field(default_factory=lambda: ModelParallelConfig(
        use_cpu_initialization=True))
    tp_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None
    expert_tp_group: Optional[dist.ProcessGroup] = None
    # Activation recompute per block: "none", "full" (the block) or "moe_only" (its MoE layer).
    recompute: str = "none"

    @property
    def tp_size(self) -> int:
        return self.tp_group.size() if self.tp_group is not None else 1

    @property
    def ep_size(self) -> int:
        return self.ep_group.size() if self.ep_group is not None else 1

    @property
    def expert_tp_size(self) -> int:
        return self.expert_tp_group.size() if self.expert_tp_group is not None else 1

    @property
    def sequence_parallel(self) -> bool:
        return bool(self.mp_config.sequence_parallel) and self.tp_size > 1

    def replicated_input(self) -> "ParallelContext":
        """The same groups for layers whose input is replicated over TP even under sequence
        parallelism (text tokens, conditioning vectors): no sequence all-gather."""
        if not self.mp_config.sequence_parallel:
            return self
        return dataclasses.replace(
            self, mp_config=dataclasses.replace(self.mp_config, sequence_parallel=False))

    @classmethod
    def meta(cls) -> "ParallelContext":
        """For building on the meta device (parameter counting): no initialisation."""
        return cls(ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False))


class ColumnLinear(nn.Module):
    """Y = X W^T + b with W split by output rows over TP; returns only the tensor."""

    def __init__(self, ctx: ParallelContext, in_features: int, out_features: int, *,
                 bias: bool = True, gather_output: bool = False, init_std: float = INIT_STD):
        super().__init__()
        self.linear = ColumnParallelLinear(
            in_features, out_features, config=ctx.mp_config, init_method=_normal_init(init_std),
            bias=bias, gather_output=gather_output, tp_group=ctx.tp_group)
        declare_linear_init(self.linear, init_std)
        _mark_split(self.linear.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self.linear, x)


def _mark_split(weight: torch.Tensor, dim: int) -> None:
    """megatron-core marks a weight's tensor-parallel split only when it initialises the
    weight itself (config.perform_initialization); a layer built without (to be loaded) is
    marked here, so that it shards, loads and checkpoints like any other."""
    if not hasattr(weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)


def _forward(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """megatron-core's forward; outside torch.distributed (no group at all, e.g. loading a
    consolidated checkpoint for sampling) the same weights as a plain linear layer."""
    if linear.tp_group is None:
        return nn.functional.linear(x, linear.weight, linear.bias)
    return linear(x)[0]


class RowLinear(nn.Module):
    """Y = X W^T + b with W split by input columns over TP, output reduced (or
    reduce-scattered along the sequence under sequence parallelism).

    Under sequence parallelism the bias is added after the reduce-scatter, to this rank's
    slice of the tokens only, so its gradient is partial: it is summed over TP on the way back
    (megatron's copy-to-TP-region), whatever the optimizer backend, instead of afterwards by
    megatron-core's finalize_model_grads (which only its DDP runs)."""

    def __init__(self, ctx: ParallelContext, in_features: int, out_features: int, *,
                 bias: bool = True, init_std: float = INIT_STD):
        super().__init__()
        self.sp_bias = bias and ctx.sequence_parallel
        self.linear = RowParallelLinear(
            in_features, out_features, config=ctx.mp_config, init_method=_normal_init(init_std),
            bias=bias, input_is_parallel=True, skip_bias_add=self.sp_bias,
            tp_group=ctx.tp_group)
        declare_linear_init(self.linear, init_std)
        _mark_split(self.linear.weight, 1)
        if self.sp_bias:
            self.linear.bias.sequence_parallel = False  # summed in backward already

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp_bias:
            out, bias = self.linear(x)
            return out + copy_to_tensor_model_parallel_region(bias, group=self.linear.tp_group)
        return _forward(self.linear, x)


class SequenceParallelLayerNorm(nn.LayerNorm):
    """An affine LayerNorm. Under sequence parallelism each TP rank normalises its own slice of
    the tokens, so the gradients of the weight and bias are partial: they are summed over TP
    on the way back (copy-to-TP-region), on every optimizer backend, as RowLinear's bias."""

    def __init__(self, ctx: ParallelContext, normalized_shape: int, eps: float = 1e-5):
        super().__init__(normalized_shape, eps=eps)
        self.sp_group = ctx.tp_group if ctx.sequence_parallel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp_group is None:
            return super().forward(x)
        weight = copy_to_tensor_model_parallel_region(self.weight, group=self.sp_group)
        bias = copy_to_tensor_model_parallel_region(self.bias, group=self.sp_group)
        return nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
