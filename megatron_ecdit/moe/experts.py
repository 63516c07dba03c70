"""Experts as one batched MLP over a fixed-shape (E, N, D) buffer.

Expert choice gives every expert exactly the same number of tokens, so all local experts run
as two batched matmuls (`torch.bmm`) with no padding, sorting or per-expert loop. Weights are
stored as (E_local, D, H_local) and (E_local, H_local, D): sharding over expert parallelism
slices dim 0, expert tensor parallelism slices H. SwiGLU's gate (w1) and up (w3) projections
are separate weights (LLaMA's names), so every weight is one plain slice of its full tensor. Under expert TP the input enters through
megatron-core's copy-to-TP-region (its gradient is summed over the shards) and the partial
outputs leave through reduce-from-TP-region; the group is handed in, never looked up.

Shape legend: E local experts, N tokens per expert, D hidden, H expert hidden (this shard).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)
from torch import nn

from megatron_ecdit.config import Activation
from megatron_ecdit.layers.param_tags import declare_init, normal


class GroupedExperts(nn.Module):
    """E independent GELU (paper) or SwiGLU MLPs, bias-free, applied as batched matmuls."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: Activation = "gelu", init_std: float = 0.02,
                 output_init_std: Optional[float] = None,
                 tp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w3 = (nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
                   if activation == "swiglu" else None)
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.init_std = init_std
        self.output_init_std = output_init_std or init_std
        self.tp_group = tp_group if tp_group is not None and tp_group.size() > 1 else None
        etp = self.tp_group.size() if self.tp_group is not None else 1
        for w, etp_dim, std in ((self.w1, 2, self.init_std), (self.w3, 2, self.init_std),
                                (self.w2, 1, self.output_init_std)):
            if w is None:
                continue
            declare_init(w, normal(std))
            # megatron-core's DDP reads `allreduce` to reduce expert grads over expert-DP
            # only; layers/param_tags.splits_of reads expert_dims = (EP dim, expert-TP dim).
            w.allreduce = False
            w.expert_dims = (0, etp_dim)
            # Split over expert-TP, each rank's shard is distinct: marked as megatron marks TP
            # weights, so both ZeRO backends count every shard in the gradient norm
            # (unmarked, only the first TP rank's would count).
            set_tensor_model_parallel_attributes(w, etp > 1, etp_dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w1.is_meta:
            return
        for w, std in ((self.w1, self.init_std), (self.w3, self.init_std),
                       (self.w2, self.output_init_std)):
            if w is not None:
                nn.init.normal_(w, std=std)

    def forward(self, x_END: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            x_END = copy_to_tensor_model_parallel_region(x_END, group=self.tp_group)
        h_ENH = torch.bmm(x_END, self.w1)
        if self.w3 is not None:  # SwiGLU: silu(x w1) * (x w3)
            h_ENH = F.silu(h_ENH) * torch.bmm(x_END, self.w3)
        else:
            h_ENH = F.gelu(h_ENH, approximate="tanh")
        y_END = torch.bmm(h_ENH, self.w2)
        if self.tp_group is not None:
            y_END = reduce_from_tensor_model_parallel_region(y_END, group=self.tp_group)
        return y_END
