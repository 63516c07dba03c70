"""Full (single-process) tensors <-> this rank's shards, by the attributes each parameter carries.

megatron-core marks tensor-parallel parameters with `tensor_model_parallel`, `partition_dim`
and `partition_stride`; our grouped experts mark `expert_dims` (the dim split over expert
parallelism, and the dim split over expert tensor parallelism). Everything else is replicated.
Used to start a parallel model from single-process weights (tests, import of consolidated
checkpoints) and to gather shards back for comparison and export.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_ecdit.models.tensor_parallel import ParallelContext


def _rank(group: Optional[dist.ProcessGroup]) -> int:
    return group.rank() if group is not None else 0


def _size(group: Optional[dist.ProcessGroup]) -> int:
    return group.size() if group is not None else 1


def shard_of(param: torch.Tensor, full: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """This rank's slice of `full` for `param`."""
    dims = getattr(param, "expert_dims", None)  # experts first: they also carry TP marks
    if dims is not None:
        ep_dim, etp_dim, halves = dims
        part = full.chunk(_size(ctx.ep_group), dim=ep_dim)[_rank(ctx.ep_group)]
        pieces = part.chunk(halves, dim=etp_dim)  # SwiGLU: shard gate and up separately
        return torch.cat([p.chunk(_size(ctx.expert_tp_group), dim=etp_dim)
                          [_rank(ctx.expert_tp_group)] for p in pieces], dim=etp_dim)
    if getattr(param, "tensor_model_parallel", False):
        if getattr(param, "partition_stride", 1) != 1:
            raise NotImplementedError("strided tensor-parallel partitions are not supported")
        return full.chunk(_size(ctx.tp_group), dim=param.partition_dim)[_rank(ctx.tp_group)]
    return full


@torch.no_grad()
def load_full_state(model: nn.Module, full_state: dict[str, torch.Tensor],
                    ctx: ParallelContext) -> None:
    """Copy this rank's shard of every parameter (and buffer) from a full state dict."""
    for name, param in model.named_parameters():
        if name not in full_state:
            raise KeyError(f"full state has no tensor {name!r}")
        shard = shard_of(param, full_state[name], ctx)
        if shard.shape != param.shape:
            raise ValueError(f"{name}: shard {tuple(shard.shape)} does not fit the parameter "
                             f"{tuple(param.shape)}")
        param.copy_(shard)


def _gather(shard: torch.Tensor, dim: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if _size(group) == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(group.size())]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def gather_full(param: torch.Tensor, ctx: ParallelContext,
                value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full tensor of `param` (or of `value`, a tensor sharded like it, e.g. its grad)."""
    value = param.detach() if value is None else value
    dims = getattr(param, "expert_dims", None)  # experts first: they also carry TP marks
    if dims is not None:
        ep_dim, etp_dim, halves = dims
        pieces = value.chunk(halves, dim=etp_dim)
        value = torch.cat([_gather(p, etp_dim, ctx.expert_tp_group) for p in pieces],
                          dim=etp_dim)
        return _gather(value, ep_dim, ctx.ep_group)
    if getattr(param, "tensor_model_parallel", False):
        return _gather(value, param.partition_dim, ctx.tp_group)
    return value
