"""Full (single-process) tensors <-> this rank's shards, by the attributes each parameter carries.

megatron-core marks tensor-parallel parameters with `tensor_model_parallel`, `partition_dim`
and `partition_stride`; our grouped experts mark `expert_dims` (the dim split over expert
parallelism, and the dim split over expert tensor parallelism); see layers/param_tags.py.
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

from megatron_ecdit.layers.param_tags import initializer_of, is_expert, splits_of
from megatron_ecdit.layers.tensor_parallel import ParallelContext


def _rank(group: Optional[dist.ProcessGroup]) -> int:
    return group.rank() if group is not None else 0


def _size(group: Optional[dist.ProcessGroup]) -> int:
    return group.size() if group is not None else 1


def _split(full: torch.Tensor, dim: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """This rank's part of `full` along `dim`."""
    return full.chunk(_size(group), dim=dim)[_rank(group)]


def _group(ctx: ParallelContext, kind: str) -> Optional[dist.ProcessGroup]:
    return {"ep": ctx.ep_group, "etp": ctx.expert_tp_group, "tp": ctx.tp_group}[kind]


def full_shape(param: torch.Tensor, ctx: ParallelContext) -> tuple[int, ...]:
    """The shape of the full single-process tensor `param` is a shard of."""
    shape = list(param.shape)
    for split in splits_of(param):
        shape[split.dim] *= _size(_group(ctx, split.group))
    return tuple(shape)


def slice_of(param: torch.Tensor, shape: tuple[int, ...] | torch.Size,
             ctx: ParallelContext) -> tuple[slice, ...]:
    """Where this rank's shard of `param` lies in its full tensor of `shape`: one slice per
    dim, cut by each split in turn as torch.chunk cuts (layers/param_tags.splits_of). A reader
    can then read that part alone (e.g. safetensors' get_slice)."""
    bounds = [(0, n) for n in shape]
    for split in splits_of(param):
        group = _group(ctx, split.group)
        start, stop = bounds[split.dim]
        step = -(-(stop - start) // _size(group))  # torch.chunk's chunk length
        lo = min(start + _rank(group) * step, stop)
        bounds[split.dim] = (lo, min(lo + step, stop))
    return tuple(slice(a, b) for a, b in bounds)


def shard_of(param: torch.Tensor, full: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """This rank's slice of `full` for `param` (layers/param_tags.splits_of)."""
    return full[slice_of(param, full.shape, ctx)]


def _shard_coordinates(param: torch.Tensor, ctx: ParallelContext) -> tuple[int, ...]:
    """Which shard of its full tensor this rank holds (equal coordinates, equal contents)."""
    return tuple(_rank(_group(ctx, split.group)) for split in splits_of(param))


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
        if is_expert(param):
            by_expert, within = splits_of(param)
            if by_expert.dim != 0:
                raise ValueError(f"{name}: experts must be stacked along dim 0")
            shape = list(param.shape[1:])
            shape[within.dim - 1] *= _size(ctx.expert_tp_group)
            first = _rank(ctx.ep_group) * param.shape[0]
            for local in range(param.shape[0]):
                full = torch.empty(shape, dtype=param.dtype)
                init(full, _generator(seed, name, first + local))
                param[local].copy_(_split(full, within.dim - 1, ctx.expert_tp_group))
            continue
        full = torch.empty(full_shape(param, ctx), dtype=param.dtype)
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
    for split in reversed(splits_of(param)):  # innermost split first
        value = _gather(value, split.dim, _group(ctx, split.group))
    return value
