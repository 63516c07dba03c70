"""Regional compilation: `torch.compile` each EC-DiT block (`train.compile`).

Every block is compiled on its own (torchtitan's `apply_compile`), so blocks of one kind share
their compiled code, compile time does not grow with depth, and parameter names do not change
(checkpoints are the same with and without). Inductor fuses what eager runs as separate
passes over memory: adaLN's modulate, gate and residual, the norms, the GELUs, the router's
softmax and the gate product of the combine. Shapes are static (`dynamic=False`): a training
block sees one shape.

Where graphs break: at megatron-core's RowParallelLinear (attention outputs, the dense FFN's
second linear), which passes no group to its linear function, whose lookup of the default
group then calls `warnings.warn` on every call; dynamo cannot trace that builtin and
resumes after it. Each block is thus a few graphs (the same few for every block of its kind,
compiled once); everything between two breaks is fused. The MoE layer's profiler ranges are
dropped from the graphs.

More than one process: the collectives of TP, SP and EP break graphs too (dynamo does not
trace megatron-core's async_op=True all-reduces); between them blocks are compiled as in one
process. The training job with compiled blocks, megatron-core's DDP and distributed optimizer
and its pipeline schedules trains like one process at TP2+SP and PP2, and EP2 and DeepSpeed
ZeRO-1 like DP2 (tests/test_entry_point.py, 1e-5). With DeepSpeed ZeRO-2, which reduces
gradients from hooks during backward, the gradients of compiled blocks differed from eager
ones (DP2: gradient norm 1.3% off after 6 steps; the cause is not found), so
`ParallelLayout.build` refuses compile with ZeRO-2 and ZeRO-3 (not tried).

Sampling (no gradients, another batch) runs the blocks eagerly (`eager_blocks`): a handful of
sampler calls does not repay a compilation, and a second set of graphs per sampler batch would
only grow the cache.
"""

from __future__ import annotations

from typing import ContextManager

import torch
from torch import nn

from megatron_ecdit.models.ecdit import ECDiTBlock


def apply_compile(model: nn.Module) -> None:
    """Compile every ECDiTBlock of `model` in place (`nn.Module.compile`)."""
    for module in model.modules():
        if isinstance(module, ECDiTBlock):
            module.compile(dynamic=False)


def eager_blocks() -> ContextManager[None]:
    """Run compiled modules eagerly inside (their original Python code)."""
    return torch.compiler.set_stance("force_eager")
