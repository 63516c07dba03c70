"""Experts as one batched MLP over a fixed-shape (E, N, D) buffer.

Expert choice gives every expert exactly the same number of tokens, so all local experts run
as two batched matmuls (`torch.bmm`) with no padding, sorting or per-expert loop. Weights are
stored as (E_local, D, H_local) and (E_local, H_local, D): sharding over expert parallelism
slices dim 0, expert tensor parallelism slices H. The partial sums of an expert-TP shard are
reduced by the caller-supplied `reduce_output` (identity in a single process); this module
never looks up process groups itself.

Shape legend: E local experts, N tokens per expert, D hidden, H expert hidden (this shard).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ecdit.config import Activation


class GroupedExperts(nn.Module):
    """E independent GELU (paper) or SwiGLU MLPs, bias-free, applied as batched matmuls."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: Activation = "gelu", init_std: float = 0.02,
                 output_init_std: Optional[float] = None,
                 reduce_output: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        super().__init__()
        self.activation = activation
        up = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, up))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.init_std = init_std
        self.output_init_std = output_init_std or init_std
        self.reduce_output = reduce_output
        # megatron-core's DDP reads `allreduce` to reduce expert grads over expert-DP only.
        for p in (self.w1, self.w2):
            p.allreduce = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w1.is_meta:
            return
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.normal_(self.w2, std=self.output_init_std)

    def forward(self, x_END: torch.Tensor) -> torch.Tensor:
        h_ENH = torch.bmm(x_END, self.w1)
        if self.activation == "swiglu":
            gate, up = h_ENH.chunk(2, dim=-1)
            h_ENH = F.silu(gate) * up
        else:
            h_ENH = F.gelu(h_ENH, approximate="tanh")
        y_END = torch.bmm(h_ENH, self.w2)
        return self.reduce_output(y_END) if self.reduce_output is not None else y_END
