"""Sharded state in megatron-core's dist_checkpointing terms, from parameter attributes.

Every tensor is described in *model space*: its key is the parameter's name in the
single-process model (blocks keep their global index at any pipeline layout), its global shape
is the full tensor's, and this rank's piece is placed by the splits the parameter's tags
declare (`layers/param_tags.splits_of`: TP layers split one axis over TP; grouped experts split
experts over EP and their hidden size over expert TP); `pipeline_parallel` embedders are
replicated on every stage. Everything else is replicated. `replica_id` is megatron's (PP, TP, DP) triple; the copy with
(0, 0, 0) is the one written. Because the format knows only the full tensors, a checkpoint
saved at one layout loads at any other (resharding), and optimizer moments described the same
way follow the parameters.
"""

from __future__ import annotations

from typing import Iterator

import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing import ShardedTensor
from torch import nn

from megatron_ecdit.layers.param_tags import is_expert, splits_of


_RANK_AND_SIZE = {  # megatron-core's view of each kind of split (layers/param_tags.Split)
    "ep": (ps.get_expert_model_parallel_rank, ps.get_expert_model_parallel_world_size),
    "etp": (ps.get_expert_tensor_parallel_rank, ps.get_expert_tensor_parallel_world_size),
    "tp": (ps.get_tensor_model_parallel_rank, ps.get_tensor_model_parallel_world_size),
}


def sharded_tensor(key: str, data: torch.Tensor, param: torch.Tensor,
                   chunk: int = 0) -> ShardedTensor:
    """`data` (this rank's piece of a tensor laid out like `param`) as a ShardedTensor.

    `chunk` is the virtual-pipeline chunk holding it; replicated embedders on chunks other than
    the first are extra replicas."""
    offsets = []
    splits = splits_of(param)
    for split in splits:
        rank, size = (f() for f in _RANK_AND_SIZE[split.group])
        if split.group == "etp" and size == 1:
            continue
        offsets.append((split.dim, rank, size))
    tp_sharded = bool(splits)
    pp_replica = 0
    if getattr(param, "pipeline_parallel", False):  # one copy per stage and model chunk
        chunks = ps.get_virtual_pipeline_model_parallel_world_size() or 1
        pp_replica = ps.get_pipeline_model_parallel_rank() * chunks + chunk
    tp_replica = 0 if tp_sharded else ps.get_tensor_model_parallel_rank()
    dp_replica = (ps.get_expert_data_parallel_rank() if is_expert(param)
                  else ps.get_data_parallel_rank())
    return ShardedTensor.from_rank_offsets(key, data, *offsets,
                                           replica_id=(pp_replica, tp_replica, dp_replica))


def named_parameters(chunks: list[nn.Module]) -> Iterator[tuple[int, str, nn.Parameter]]:
    """(chunk index, model-space name, parameter) over this rank's model chunks."""
    for v, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            yield v, name, param


def model_state(chunks: list[nn.Module], prefix: str = "model.") -> dict[str, ShardedTensor]:
    """The parameters themselves (not copies), so that megatron-core's optimizers can match
    their state to them. Keys carry the chunk index only for duplicates (replicated embedders
    on a second virtual-pipeline chunk)."""
    state = {}
    for v, name, param in named_parameters(chunks):
        entry = f"{v}.{name}" if f"{prefix}{name}" in state else name
        state[f"{prefix}{entry}"] = sharded_tensor(f"{prefix}{name}", param, param, v)
    return state


def like_params(chunks: list[nn.Module], tensors: dict[str, torch.Tensor], prefix: str,
                names: dict[str, str]) -> dict[str, ShardedTensor]:
    """Tensors shaped like the parameters (EMA weights, optimizer moments) under `prefix`.

    names maps each entry of `tensors` to its parameter's model-space name."""
    params = {(v, name): p for v, name, p in named_parameters(chunks)}
    state = {}
    for entry, tensor in tensors.items():
        v, name = names[entry]
        state[f"{prefix}{entry}"] = sharded_tensor(f"{prefix}{name}", tensor, params[v, name], v)
    return state
