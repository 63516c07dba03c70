"""Full (single-process) tensors <-> this rank's shards, by the attributes each parameter carries.

megatron-core marks tensor-parallel parameters with `tensor_model_parallel`, `partition_dim`
and `partition_stride`; our grouped experts mark `expert_dims` (the dim split over expert
parallelism, and the dim split over expert tensor parallelism); see models/param_tags.py.
Everything else is replicated. Used to draw a model's initial weights independently of the
layout (`initialize`), to start a parallel model from single-process weights (tests, import
of consolidated checkpoints) and to gather shards back for comparison and export.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_ecdit.models.param_tags import initializer_of
from megatron_ecdit.models.tensor_parallel import ParallelContext


def _rank(group: Optional[dist.ProcessGroup]) -> int:
    return group.rank() if group is not None else 0


def _size(group: Optional[dist.ProcessGroup]) -> int:
    return group.size() if group is not None else 1


def _split(full: torch.Tensor, dim: int, halves: int,
           group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """This rank's part of `full` along `dim`, where `full` is `halves` pieces split separately
    (SwiGLU's gate and up)."""
    pieces = full.chunk(halves, dim=dim)
    return torch.cat([p.chunk(_size(group), dim=dim)[_rank(group)] for p in pieces], dim=dim)


def shard_of(param: torch.Tensor, full: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """This rank's slice of `full` for `param`."""
    dims = getattr(param, "expert_dims", None)  # experts first: they also carry TP marks
    if dims is not None:
        ep_dim, etp_dim, halves = dims
        part = full.chunk(_size(ctx.ep_group), dim=ep_dim)[_rank(ctx.ep_group)]
        return _split(part, etp_dim, halves, ctx.expert_tp_group)
    if getattr(param, "tensor_model_parallel", False):
        if getattr(param, "partition_stride", 1) != 1:
            raise NotImplementedError("strided tensor-parallel partitions are not supported")
        return _split(full, param.partition_dim, 1, ctx.tp_group)
    return full


def _shard_coordinates(param: torch.Tensor, ctx: ParallelContext) -> tuple[int, ...]:
    """Which shard of its full tensor this rank holds (equal coordinates, equal contents)."""
    if getattr(param, "expert_dims", None) is not None:
        return _rank(ctx.ep_group), _rank(ctx.expert_tp_group)
    if getattr(param, "tensor_model_parallel", False):
        return (_rank(ctx.tp_group),)
    return ()


def _generator(seed: int, *key) -> torch.Generator:
    """A generator seeded by a stable hash of (seed, key): the same in every process."""
    digest = hashlib.sha256("/".join(map(str, (seed, *key))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def initialize(model: nn.Module, seed: int, ctx: ParallelContext) -> None:
    """Draw every parameter's initial value as a function of (seed, its model-space name, its
    position in the full tensor) only, never of the layout, the rank or the order in which
    modules were built: the full tensor is drawn from a generator seeded by the name and this
    rank keeps its slice. Expert weights are drawn one expert at a time from a generator seeded
    by (name, global expert index), so a rank draws only its own experts (at M-64E width one
    expert matrix is 150 MB; a whole layer's would be 9.6 GB). Replicated parameters come out
    identical everywhere by construction (`check_replicas` verifies it)."""
    for name, param in model.named_parameters():
        init = initializer_of(name, param)
        dims = getattr(param, "expert_dims", None)
        if dims is not None:
            ep_dim, etp_dim, halves = dims
            if ep_dim != 0:
                raise ValueError(f"{name}: experts must be stacked along dim 0")
            shape = list(param.shape[1:])
            shape[etp_dim - 1] *= _size(ctx.expert_tp_group)
            first = _rank(ctx.ep_group) * param.shape[0]
            for local in range(param.shape[0]):
                full = torch.empty(shape, dtype=param.dtype)
                init(full, _generator(seed, name, first + local))
                param[local].copy_(_split(full, etp_dim - 1, halves, ctx.expert_tp_group))
            continue
        shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= _size(ctx.tp_group)
        full = torch.empty(shape, dtype=param.dtype)
        init(full, _generator(seed, name))
        param.copy_(shard_of(param, full, ctx))


def check_replicas(chunks: list[nn.Module], ctx: ParallelContext) -> None:
    """Collective over the world: every copy of a parameter shard (the same name and shard
    coordinates, on any rank, stage or model chunk) must be bit-identical. Raises naming the
    first parameter whose copies differ."""
    mine = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            data = param.detach().cpu().contiguous().view(torch.uint8).numpy()
            mine.setdefault((name, _shard_coordinates(param, ctx)), set()).add(
                hashlib.sha256(data).hexdigest())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    seen: dict = defaultdict(set)
    for ranks_view in everyone:
        for key, digests in ranks_view.items():
            seen[key] |= digests
    for (name, coordinates), digests in sorted(seen.items()):
        if len(digests) > 1:
            raise RuntimeError(f"parameter {name} (shard {coordinates}) differs between its "
                               f"replicas: {len(digests)} distinct copies")


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
