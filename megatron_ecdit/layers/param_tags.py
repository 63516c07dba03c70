"""The attributes a parameter carries, declared once: who sets each and what it means.

Layers set these where they create a parameter; `parallel/` (sharding, gradient reduction,
ZeRO backends) and `checkpoint/` read them. Nothing else decides how a parameter is split,
reduced or drawn.

| attribute | set by | meaning |
|---|---|---|
| `tensor_model_parallel`, `partition_dim`, `partition_stride` | megatron-core's TP layers; `moe/experts.py` (expert-TP) | one axis is split over (expert-)TP ranks; megatron's and DeepSpeed's grad-norm code count every shard |
| `expert_dims` = (ep_dim, etp_dim) | `moe/experts.py` | experts split over EP along ep_dim, hidden over expert-TP along etp_dim |
| `allreduce` = False | `moe/experts.py` | an expert parameter: gradients reduced over expert-DP, not DP (megatron-core DDP and DeepSpeed read it) |
| `sequence_parallel` | megatron-core (set False here) | sees a sequence slice under SP: gradients summed over TP by megatron's finalize_model_grads. None of ours carries it: the layers in the SP region with parameters (layers/tensor_parallel.py's RowLinear bias and SequenceParallelLayerNorm, adaLN's modulation) sum their gradients over TP in backward, so every backend gets them whole |
| `pipeline_parallel` | `models/ecdit.py` | a conditioning embedder replicated on every pipeline stage: gradients summed over the pipeline group |
| `shared` | `models/ecdit.py` | a replica off the first stage: counted once in the gradient norm |
| `initializer` | every layer (`declare_init`) | how the full single-process tensor is drawn from a generator (`parallel/sharding.py` draws it by name and keeps this rank's slice) |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import nn

Initializer = Callable[[torch.Tensor, torch.Generator], None]


@dataclass(frozen=True)
class Split:
    """One axis along which a parameter's full tensor is split over the ranks of a group."""

    dim: int
    group: Literal["ep", "etp", "tp"]  # expert-parallel, expert-tensor-parallel, tensor-parallel


def is_expert(param: torch.Tensor) -> bool:
    return getattr(param, "expert_dims", None) is not None


def splits_of(param: torch.Tensor) -> list[Split]:
    """The rule for which slice of the full tensor a rank holds: the splits of `param`,
    outermost first (a rank's slice is the full tensor cut by each in turn). Both the in-memory
    shard/gather (parallel/sharding.py) and the checkpoint description (checkpoint/sharded.py)
    follow it."""
    if is_expert(param):  # first: split experts also carry megatron's TP marks
        ep_dim, etp_dim = param.expert_dims
        return [Split(ep_dim, "ep"), Split(etp_dim, "etp")]
    if getattr(param, "tensor_model_parallel", False):
        if getattr(param, "partition_stride", 1) != 1:
            raise NotImplementedError("strided tensor-parallel partitions are not supported")
        return [Split(param.partition_dim, "tp")]
    return []


def normal(std: float) -> Initializer:
    """N(0, std^2); std = 0 gives zeros (adaLN-Zero, zero-initialised outputs)."""
    def init(tensor: torch.Tensor, generator: torch.Generator) -> None:
        if std == 0:
            tensor.zero_()
        else:
            tensor.normal_(0.0, std, generator=generator)
    return init


def zeros(tensor: torch.Tensor, generator: torch.Generator) -> None:
    tensor.zero_()


def ones(tensor: torch.Tensor, generator: torch.Generator) -> None:
    tensor.fill_(1.0)


def xavier_uniform(tensor: torch.Tensor, generator: torch.Generator) -> None:
    nn.init.xavier_uniform_(tensor, generator=generator)


def declare_init(param: Optional[torch.Tensor], initializer: Initializer) -> None:
    if param is not None:
        param.initializer = initializer


def declare_linear_init(linear: nn.Module, std: float) -> None:
    """A linear layer (torch's or megatron-core's): weight N(0, std^2), bias zero."""
    declare_init(linear.weight, normal(std))
    declare_init(getattr(linear, "bias", None), zeros)


def declare_norm_init(norm: nn.Module) -> None:
    """An affine LayerNorm: weight one, bias zero (nothing to do without affine parameters)."""
    declare_init(getattr(norm, "weight", None), ones)
    declare_init(getattr(norm, "bias", None), zeros)


def initializer_of(name: str, param: torch.Tensor) -> Initializer:
    init = getattr(param, "initializer", None)
    if init is None:
        raise ValueError(f"parameter {name!r} declares no initializer (layers/param_tags.py)")
    return init
