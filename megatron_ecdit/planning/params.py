"""Parameters of one rank at a layout, from the real modules.

The unsharded parts of the network (embedders, patch embedding, final layer, one dense block,
one MoE block) are built once on the meta device, and each parameter is cut by its splits
(`layers/param_tags.splits_of`): the rule sharding, checkpoints and the layers themselves
follow. So a count here cannot drift from the code; tests/test_planning.py also builds the
real shard of chosen ranks at 64 to 512 ranks under a fake process group and compares.

Pipeline stages and virtual chunks follow `models/ecdit.stage_layers`; every chunk carries its
own replica of the conditioning embedders, the first chunk of the first stage the patch
embedding, the last chunk of the last stage the final layer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from megatron_ecdit.config import ModelConfig, MoEConfig
from megatron_ecdit.models.ecdit import ECDiT, ECDiTBlock, stage_layers
from megatron_ecdit.layers.param_tags import is_expert, splits_of
from megatron_ecdit.layers.tensor_parallel import ParallelContext


@dataclass(frozen=True)
class ParamCount:
    dense: int = 0  # sharded over TP at most; replicated over DP
    expert: int = 0  # sharded over EP and expert-TP; replicated over expert-DP

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def __add__(self, other: "ParamCount") -> "ParamCount":
        return ParamCount(self.dense + other.dense, self.expert + other.expert)

    def __mul__(self, k: int) -> "ParamCount":
        return ParamCount(self.dense * k, self.expert * k)


def _shard_count(module: nn.Module, sizes: dict[str, int]) -> ParamCount:
    dense = expert = 0
    for p in module.parameters():
        n = p.numel() // math.prod(sizes[s.group] for s in splits_of(p))
        if is_expert(p):
            expert += n
        else:
            dense += n
    return ParamCount(dense, expert)


class _OneRank:
    """A process group of one rank, standing in for every group of the unsharded parts: given
    no group, megatron-core's layers fall back to its global groups where those exist."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


@functools.lru_cache(maxsize=64)
def _parts(model_json: str, moe_json: str) -> dict[str, nn.Module]:
    model = ModelConfig(**json.loads(model_json))
    moe = MoEConfig(**json.loads(moe_json))
    one = _OneRank()
    # Size-one groups, so that every split is declared as at any TP size.
    ctx = ParallelContext(tp_group=one, ep_group=one, expert_tp_group=one)
    with torch.device("meta"):
        ends = ECDiT(model, moe, ctx, layers=range(0))
        parts = {"embedders": nn.ModuleList([ends.t_embedder, ends.caption_proj]),
                 "patch_embed": ends.patch_embed, "final": ends.final,
                 "dense_block": ECDiTBlock(ctx, model, moe, None)}
        if moe.num_experts:
            parts["moe_block"] = ECDiTBlock(ctx, model, moe, moe.capacity_factor)
    return parts


def rank_params(model: ModelConfig, moe: MoEConfig, *, tp: int = 1, pp: int = 1, vpp: int = 1,
                ep: int = 1, etp: int | None = None, pp_rank: int = 0) -> ParamCount:
    """Parameters held by a rank of pipeline stage `pp_rank` (every TP/EP/DP rank of a stage
    holds the same number: splits are even)."""
    parts = _parts(json.dumps(dataclasses.asdict(model), sort_keys=True),
                   json.dumps(dataclasses.asdict(moe), sort_keys=True))
    sizes = {"tp": tp, "ep": ep, "etp": etp if etp is not None else tp}
    count = {name: _shard_count(part, sizes) for name, part in parts.items()}
    moe_layers = set(moe.moe_layer_indices(model.num_layers))
    total = count["embedders"] * vpp
    if pp_rank == 0:
        total += count["patch_embed"]
    if pp_rank == pp - 1:
        total += count["final"]
    for chunk in range(vpp):
        for i in stage_layers(model.num_layers, pp, vpp, pp_rank, chunk):
            total += count["moe_block" if i in moe_layers else "dense_block"]
    return total
