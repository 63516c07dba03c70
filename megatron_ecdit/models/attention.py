"""Grouped-query self- and cross-attention on megatron-core tensor-parallel linears.

Q, K and V are ColumnParallel (heads split over TP), the output projection is RowParallel.
Attention itself is `scaled_dot_product_attention` with `enable_gqa`, so KV heads are never
materialised per query head. Cross-attention reads the projected text tokens and honours the
text padding mask; its K/V inputs are replicated over TP even under sequence parallelism.

Shape legend: S image tokens (local shard under SP), L text tokens, B batch, D hidden,
H query heads on this rank, G KV heads on this rank, K head dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ecdit.layers.tensor_parallel import ColumnLinear, ParallelContext, RowLinear


def _heads(x_SBX: torch.Tensor, head_dim: int) -> torch.Tensor:
    S, B, _ = x_SBX.shape
    return x_SBX.view(S, B, -1, head_dim).permute(1, 2, 0, 3)  # (B, H, S, K)


class Attention(nn.Module):
    """Self-attention when `context` is None, else cross-attention to `context`."""

    def __init__(self, ctx: ParallelContext, hidden_size: int, num_heads: int,
                 num_kv_heads: int, *, cross: bool = False, zero_out: bool = False):
        super().__init__()
        if num_heads % ctx.tp_size or num_kv_heads % ctx.tp_size:
            raise ValueError(f"heads ({num_heads}) and KV heads ({num_kv_heads}) must be "
                             f"divisible by tensor parallel size {ctx.tp_size}")
        self.head_dim = hidden_size // num_heads
        kv_width = num_kv_heads * self.head_dim
        kv_ctx = ctx.replicated_input() if cross else ctx
        self.q = ColumnLinear(ctx, hidden_size, hidden_size)
        self.k = ColumnLinear(kv_ctx, hidden_size, kv_width)
        self.v = ColumnLinear(kv_ctx, hidden_size, kv_width)
        # Cross-attention's output starts at zero so the block is the identity (PixArt-alpha).
        self.out = RowLinear(ctx, hidden_size, hidden_size, init_std=0.0 if zero_out else 0.02)

    def forward(self, x_SBD: torch.Tensor, context_LBD: Optional[torch.Tensor] = None,
                context_mask_BL: Optional[torch.Tensor] = None) -> torch.Tensor:
        source = x_SBD if context_LBD is None else context_LBD
        q = _heads(self.q(x_SBD), self.head_dim)
        k = _heads(self.k(source), self.head_dim)
        v = _heads(self.v(source), self.head_dim)
        mask = None
        if context_mask_BL is not None:
            mask = context_mask_BL[:, None, None, :].to(torch.bool)  # (B, 1, 1, L)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # torch's CPU flash-attention kernel is 2.5-4x slower in bf16 than in fp32 (its
            # backward most; measured at the demo's and XL's shapes), so on a CPU the
            # attention core runs in fp32 and only the projections in bf16.
            o_BHSK = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                    attn_mask=mask, enable_gqa=True).to(q.dtype)
        else:
            o_BHSK = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        S, B = o_BHSK.shape[2], o_BHSK.shape[0]
        return self.out(o_BHSK.permute(2, 0, 1, 3).reshape(S, B, -1))
