"""Routers: which tokens each expert processes, and with what gate.

The expert-choice router follows EC-DiT (Sun et al., 2025), Algorithm 1: affinities are a
softmax over experts of x . W_r (computed in fp32), and each expert takes its top-C tokens
within a *pool* (per sample by default). Gates are the raw affinities of the chosen tokens.
The token-choice router is the GShard-style top-k baseline with a capacity limit, token
dropping and the auxiliary load-balancing loss.

Both return a `Routing`: for every (expert, slot) the flat index of a token and its gate, in a
fixed (E, N) shape, so the MoE layer runs its experts on one fixed-shape buffer. Routers do not
touch hidden states beyond computing logits, and know nothing of process groups.

Shape legend: S sequence, B batch, D hidden, Dc conditioning width, E experts,
P pools, T tokens per pool, C capacity (slots per expert per pool), N = P * C, K top-k.
Tokens are flattened in megatron's sequence-first order: flat = s * B + b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ecdit.config import ConfigError, GateKind, PoolKind
from megatron_ecdit.layers.param_tags import declare_init, normal


def expert_capacity(tokens_per_pool: int, num_experts: int, capacity_factor: float,
                    top_k: int = 1) -> int:
    """C = ceil(top_k * T * f_c / E), clipped to [1, T].

    Rounding up means experts together process at least T * f_c token slots, so with f_c = 2
    every expert's compute matches token-choice top-2 (the paper's matching rule) even when E
    does not divide T * f_c. C can never exceed T: an expert cannot pick a token twice.
    """
    if capacity_factor <= 0:
        raise ConfigError(f"moe.capacity_factor must be > 0, got {capacity_factor}")
    raw = math.ceil(top_k * tokens_per_pool * capacity_factor / num_experts - 1e-9)
    return max(1, min(tokens_per_pool, raw))


def pool_shape(seq_len: int, batch: int, pool: PoolKind, group_size: int) -> tuple[int, int]:
    """(P, T): how the S * B tokens of a micro-batch split into routing pools.

    Pools are taken in sample-major order (all of sample 0, then sample 1, ...), so "sample"
    pools are single images and "group" pools are runs of `group_size` consecutive tokens.
    """
    if pool == "sample":
        return batch, seq_len
    if pool == "micro_batch":
        return 1, batch * seq_len
    if pool == "group":
        total = batch * seq_len
        if total % group_size:
            raise ConfigError(f"moe.group_size={group_size} does not divide the "
                              f"{total} tokens of a micro-batch ({batch} x {seq_len})")
        return total // group_size, group_size
    raise ConfigError(f"unknown moe.pool {pool!r}; expected sample, group or micro_batch")


def pooled_to_flat(index_PT: torch.Tensor, tokens_per_pool: int, seq_len: int,
                   batch: int) -> torch.Tensor:
    """Map token positions within pools (any shape, with the pool as dim 0) to flat s*B+b."""
    pools = torch.arange(index_PT.shape[0], device=index_PT.device)
    pools = pools.view(-1, *([1] * (index_PT.dim() - 1)))
    q = pools * tokens_per_pool + index_PT  # sample-major position b * S + s
    return (q % seq_len) * batch + q // seq_len


def to_pools(scores_SBE: torch.Tensor, num_pools: int, tokens_per_pool: int) -> torch.Tensor:
    """(S, B, E) -> (P, T, E) in sample-major order."""
    return scores_SBE.transpose(0, 1).reshape(num_pools, tokens_per_pool, -1)


@dataclass
class Routing:
    """Which token fills each expert slot, and its gate. Fixed shapes, no padding logic."""

    token_index_EN: torch.Tensor  # (E, N) flat token index s * B + b
    gate_EN: torch.Tensor  # (E, N) fp32 gate; 0 for an empty slot
    probs_SBE: torch.Tensor  # (S, B, E) fp32 router affinities (for statistics)
    aux_loss: Optional[torch.Tensor] = None  # token-choice load-balancing loss


class _RouterBase(nn.Module):
    """Router weight W_r (D [+ Dc], E) kept in fp32, and fp32 logits."""

    def __init__(self, hidden_size: int, num_experts: int, cond_size: int = 0):
        super().__init__()
        self.num_experts = num_experts
        # fp32 regardless of the model's dtype (paper: router kept in fp32).
        self.weight = nn.Parameter(torch.empty(hidden_size, num_experts, dtype=torch.float32))
        self.cond_weight = (nn.Parameter(torch.empty(cond_size, num_experts, dtype=torch.float32))
                            if cond_size else None)
        declare_init(self.weight, normal(0.02))
        declare_init(self.cond_weight, normal(0.02))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        if self.cond_weight is not None:
            nn.init.normal_(self.cond_weight, std=0.02)

    def affinities(self, x_SBD: torch.Tensor, cond_BDc: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax_E(x . W_r) in fp32 -> (S, B, E)."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(device_type=x_SBD.device.type, enabled=False):
            logits_SBE = x_SBD.to(dtype) @ self.weight.to(dtype)
            if self.cond_weight is not None:
                if cond_BDc is None:
                    raise ValueError("this router reads the timestep embedding; pass cond")
                logits_SBE = logits_SBE + (cond_BDc.to(dtype) @ self.cond_weight.to(dtype))[None]
            return logits_SBE.softmax(dim=-1)


class ExpertChoiceRouter(_RouterBase):
    """Each expert picks its top-C tokens of each pool (EC-DiT Algorithm 1, steps 1-2)."""

    def __init__(self, hidden_size: int, num_experts: int, capacity_factor: float,
                 pool: PoolKind = "sample", group_size: int = 1024, gate: GateKind = "raw",
                 gate_scale: float = 1.0, cond_size: int = 0):
        super().__init__(hidden_size, num_experts, cond_size)
        self.capacity_factor = capacity_factor
        self.pool = pool
        self.group_size = group_size
        self.gate = gate
        self.gate_scale = gate_scale

    def capacity(self, tokens_per_pool: int) -> int:
        return expert_capacity(tokens_per_pool, self.num_experts, self.capacity_factor)

    def forward(self, x_SBD: torch.Tensor, cond_BDc: Optional[torch.Tensor] = None) -> Routing:
        S, B, _ = x_SBD.shape
        P, T = pool_shape(S, B, self.pool, self.group_size)
        C = self.capacity(T)
        probs_SBE = self.affinities(x_SBD, cond_BDc)
        affinity_PET = to_pools(probs_SBE, P, T).transpose(1, 2)
        gate_PEC, index_PEC = torch.topk(affinity_PET, k=C, dim=-1)
        token_EPC = pooled_to_flat(index_PEC, T, S, B).permute(1, 0, 2)
        token_EN = token_EPC.reshape(self.num_experts, P * C)
        gate_EN = gate_PEC.permute(1, 0, 2).reshape(self.num_experts, P * C)
        if self.gate == "renormalized":
            # Nucleus-Image style: a token's gates sum to gate_scale over the experts that took it.
            total = torch.zeros(S * B, dtype=gate_EN.dtype, device=gate_EN.device)
            total = total.index_add(0, token_EN.reshape(-1), gate_EN.reshape(-1))
            # The epsilon guards a token whose chosen affinities all underflowed to zero.
            gate_EN = gate_EN / total[token_EN].clamp_min(1e-9) * self.gate_scale
        return Routing(token_EN, gate_EN, probs_SBE)


class TokenChoiceRouter(_RouterBase):
    """GShard-style top-k token choice with capacity, dropping and a load-balancing loss.

    Gates are the top-k affinities renormalised over the k choices (GShard). Slots are filled
    in priority order: every token's first choice before any second choice, then token order.
    Assignments past an expert's capacity are dropped (the token keeps its residual). The
    auxiliary loss is E * sum_e f_e * P_e, with f_e the fraction of the T * k assignments
    (before dropping) sent to expert e and P_e the mean affinity of e, averaged over pools.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, capacity_factor: float,
                 pool: PoolKind = "sample", group_size: int = 1024, cond_size: int = 0):
        super().__init__(hidden_size, num_experts, cond_size)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.pool = pool
        self.group_size = group_size

    def capacity(self, tokens_per_pool: int) -> int:
        return expert_capacity(tokens_per_pool, self.num_experts, self.capacity_factor,
                               self.top_k)

    def forward(self, x_SBD: torch.Tensor, cond_BDc: Optional[torch.Tensor] = None) -> Routing:
        S, B, _ = x_SBD.shape
        E, K = self.num_experts, self.top_k
        P, T = pool_shape(S, B, self.pool, self.group_size)
        C = self.capacity(T)
        probs_SBE = self.affinities(x_SBD, cond_BDc)
        probs_PTE = to_pools(probs_SBE, P, T)
        top_PTK, expert_PTK = torch.topk(probs_PTE, k=K, dim=-1)
        gates_PTK = top_PTK / top_PTK.sum(dim=-1, keepdim=True)

        # Priority order: choice rank first, then token position.
        onehot_PKTE = F.one_hot(expert_PTK.transpose(1, 2), E)  # (P, K, T, E)
        flat_onehot = onehot_PKTE.reshape(P, K * T, E)
        slot = (flat_onehot.cumsum(dim=1) - 1) * flat_onehot  # position within the expert
        slot_PKT = slot.sum(-1).view(P, K, T)
        kept_PKT = slot_PKT < C

        fraction_PE = flat_onehot.float().mean(dim=1)  # f_e per pool (sums to 1 over e)
        aux_loss = E * (fraction_PE * probs_PTE.mean(dim=1)).sum(-1).mean()

        # Scatter kept assignments into the fixed (P, E, C) slot table; empty slots gate 0.
        token_PEC = torch.zeros(P, E * C, dtype=torch.long, device=x_SBD.device)
        gate_PEC = torch.zeros(P, E * C, dtype=probs_SBE.dtype, device=x_SBD.device)
        dest = expert_PTK.transpose(1, 2) * C + slot_PKT.clamp(max=C - 1)
        dest = torch.where(kept_PKT, dest, E * C)  # a dummy column for dropped assignments
        positions = torch.arange(T, device=x_SBD.device).expand(P, K, T)
        token_PEC = torch.cat([token_PEC, token_PEC[:, :1]], 1).scatter(
            1, dest.reshape(P, -1), positions.reshape(P, -1))[:, :-1]
        gate_PEC = torch.cat([gate_PEC, gate_PEC[:, :1]], 1).scatter(
            1, dest.reshape(P, -1), gates_PTK.transpose(1, 2).reshape(P, -1))[:, :-1]
        token_EPC = pooled_to_flat(token_PEC.view(P, E, C), T, S, B).permute(1, 0, 2)
        gate_EPC = gate_PEC.view(P, E, C).permute(1, 0, 2)
        return Routing(token_EPC.reshape(E, P * C), gate_EPC.reshape(E, P * C), probs_SBE,
                       aux_loss)
