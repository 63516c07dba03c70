"""The MoE FFN: route -> dispatch -> experts -> combine (Megatron-LM's phase names).

`MoELayer` works with any router that returns a fixed-shape `Routing` (expert choice by
default, token choice as the baseline). Dispatch is an index gather into one (E, N, D) buffer,
combine a gate-weighted scatter-add back to the tokens: the one-hot (B, E, C, S) tensor of
Algorithm 1 is never built (see `reference.py` for the literal version used as a test oracle).
A token chosen by no expert gets zero here and keeps only the block's residual.

Movement of the expert buffer between ranks is the dispatcher's job (`LocalDispatcher` in one
process; an all-to-all under expert parallelism, moe/dispatch.py), so the math in this file
never changes with the layout. Under sequence parallelism each TP rank holds a slice of every
image's tokens, but an expert chooses among all tokens of an image: the layer gathers the
sequence on entry and keeps its own slice on exit. `DenseFFN` is the dense baseline under the
same interface.

Shape legend: S sequence, B batch, D hidden, E experts, N tokens per expert, Dc cond width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (gather_from_sequence_parallel_region,
                                                    scatter_to_sequence_parallel_region)
from torch import nn
from torch.profiler import record_function

from megatron_ecdit.config import MoEConfig
from megatron_ecdit.layers.tensor_parallel import ColumnLinear, ParallelContext, RowLinear
from megatron_ecdit.moe.dispatch import AllToAllDispatcher
from megatron_ecdit.moe.experts import GroupedExperts
from megatron_ecdit.moe.router import ExpertChoiceRouter, Routing, TokenChoiceRouter


@dataclass
class RoutingStats:
    """What the paper plots and what training logs; computed without gradients."""

    experts_per_token: torch.Tensor  # (B, S): how many experts chose each token (compute map)
    unrouted_fraction: torch.Tensor  # scalar: share of tokens chosen by no expert
    expert_mean_gate: torch.Tensor  # (E,): mean gate of each expert's chosen tokens
    router_entropy: torch.Tensor  # scalar: mean entropy of the per-token affinities (nats)
    aux_loss: Optional[torch.Tensor] = None  # scalar, token choice only (its value, detached)

    @property
    def mean_experts_per_token(self) -> torch.Tensor:
        return self.experts_per_token.float().mean()


@dataclass
class FFNOutput:
    output: torch.Tensor  # (S, B, D)
    stats: Optional[RoutingStats] = None
    aux_loss: Optional[torch.Tensor] = None


class AuxLossOnGradientPath(torch.autograd.Function):
    """Identity on the layer's output whose backward also starts the auxiliary loss's gradient,
    scaled by `scale` (megatron-core's MoEAuxLossAutoScaler). The loss thus reaches its router
    from inside the layer, on whatever pipeline stage holds it, instead of being handed up to
    the training loop."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


class LocalDispatcher(nn.Module):
    """All experts live in this process: dispatch and combine are the identity."""

    def dispatch(self, x_END: torch.Tensor) -> torch.Tensor:
        return x_END

    def combine(self, y_END: torch.Tensor) -> torch.Tensor:
        return y_END


def routing_stats(routing: Routing, seq_len: int, batch: int) -> RoutingStats:
    with torch.no_grad():
        chosen_EN = routing.gate_EN > 0
        counts = torch.zeros(seq_len * batch, device=chosen_EN.device)
        counts.index_add_(0, routing.token_index_EN.reshape(-1), chosen_EN.reshape(-1).float())
        counts_BS = counts.view(seq_len, batch).t()
        gate_sum = (routing.gate_EN * chosen_EN).sum(-1)
        mean_gate = gate_sum / chosen_EN.sum(-1).clamp(min=1)
        p = routing.probs_SBE
        entropy = -(p * p.clamp(min=1e-20).log()).sum(-1).mean()
        aux = None if routing.aux_loss is None else routing.aux_loss.detach()
        return RoutingStats(counts_BS, (counts_BS == 0).float().mean(), mean_gate, entropy, aux)


class MoELayer(nn.Module):
    """Mixture-of-experts FFN with fixed-shape expert buffers.

    A router with an auxiliary loss (token choice) adds `aux_loss_coeff * aux_grad_scale`
    times its gradient on the backward pass (`AuxLossOnGradientPath`). The training job sets
    `aux_grad_scale` to 1 / micro-batches per step (`set_aux_grad_scale`), matching how it
    scales the main loss."""

    def __init__(self, router: nn.Module, experts: GroupedExperts,
                 dispatcher: Optional[nn.Module] = None,
                 shared_expert: Optional[nn.Module] = None,
                 sequence_parallel_group: Optional[dist.ProcessGroup] = None,
                 aux_loss_coeff: float = 0.0):
        super().__init__()
        self.aux_loss_coeff = aux_loss_coeff
        self.aux_grad_scale = 1.0
        self.router = router
        self.experts = experts
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        self.shared_expert = shared_expert
        self.sp_group = sequence_parallel_group

    def forward(self, x_SBD: torch.Tensor, router_x_SBD: Optional[torch.Tensor] = None,
                cond_BDc: Optional[torch.Tensor] = None) -> FFNOutput:
        if self.sp_group is None:
            return self._forward(x_SBD, router_x_SBD, cond_BDc)
        # Every TP rank routes the whole sequence; gradients flow back to each rank's slice.
        out = self._forward(self._gather(x_SBD), self._gather(router_x_SBD), cond_BDc)
        out.output = scatter_to_sequence_parallel_region(out.output, group=self.sp_group)
        return out

    def _gather(self, x_SBD: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if x_SBD is None:
            return None
        return gather_from_sequence_parallel_region(x_SBD, tensor_parallel_output_grad=False,
                                                    group=self.sp_group)

    def _forward(self, x_SBD: torch.Tensor, router_x_SBD: Optional[torch.Tensor],
                 cond_BDc: Optional[torch.Tensor]) -> FFNOutput:
        S, B, D = x_SBD.shape
        x_flat = x_SBD.reshape(S * B, D)

        # Each phase is a named range in profiles (benchmarks/bench_train_step.py reads them).
        # 1. route: which token fills each (expert, slot), and its gate.
        with record_function("moe.route"):
            routing = self.router(x_SBD if router_x_SBD is None else router_x_SBD, cond_BDc)
        # 2. dispatch: gather tokens into the fixed (E, N, D) buffer, move it to its experts.
        with record_function("moe.dispatch"):
            x_END = self.dispatcher.dispatch(x_flat[routing.token_index_EN])
        # 3. experts: one batched MLP over all local experts.
        with record_function("moe.experts"):
            y_END = self.experts(x_END)
        # 4. combine: bring the outputs back, then out[s] = sum over experts e that chose s
        # of gate[e, s] * expert_e(x[s]).
        with record_function("moe.combine"):
            y_END = self.dispatcher.combine(y_END)
            weighted = (y_END * routing.gate_EN.unsqueeze(-1).to(y_END.dtype)).reshape(-1, D)
            out = torch.zeros_like(x_flat, dtype=weighted.dtype)
            out = out.index_add(0, routing.token_index_EN.reshape(-1), weighted)
            out_SBD = out.view(S, B, D)
        if self.shared_expert is not None:  # a dense TP FFN on the full (gathered) sequence
            out_SBD = out_SBD + self.shared_expert(x_SBD).output
        if routing.aux_loss is not None and torch.is_grad_enabled():
            out_SBD = AuxLossOnGradientPath.apply(out_SBD, routing.aux_loss,
                                                  self.aux_loss_coeff * self.aux_grad_scale)
        return FFNOutput(out_SBD, routing_stats(routing, S, B), routing.aux_loss)


class DenseFFN(nn.Module):
    """The dense baseline: Linear -> GELU (or SwiGLU) -> Linear, tensor-parallel."""

    def __init__(self, ctx: ParallelContext, hidden_size: int, ffn_hidden_size: int,
                 activation: str = "gelu", output_init_std: float = 0.02):
        super().__init__()
        self.fc1 = ColumnLinear(ctx, hidden_size, ffn_hidden_size)
        # SwiGLU's up projection is its own column-parallel weight (LLaMA's w3), so each
        # weight is one plain slice of its full tensor at any TP size.
        self.fc3 = (ColumnLinear(ctx, hidden_size, ffn_hidden_size) if activation == "swiglu"
                    else None)
        self.fc2 = RowLinear(ctx, ffn_hidden_size, hidden_size, init_std=output_init_std)

    def forward(self, x_SBD: torch.Tensor, router_x_SBD: Optional[torch.Tensor] = None,
                cond_BDc: Optional[torch.Tensor] = None) -> FFNOutput:
        h = self.fc1(x_SBD)
        if self.fc3 is not None:  # SwiGLU: silu(x fc1) * (x fc3)
            h = F.silu(h) * self.fc3(x_SBD)
        else:
            h = F.gelu(h, approximate="tanh")
        return FFNOutput(self.fc2(h))


def build_ffn(ctx: ParallelContext, hidden_size: int, ffn_hidden_size: int, moe: MoEConfig,
              capacity_factor: Optional[float], cond_size: int = 0) -> nn.Module:
    """A dense FFN when capacity_factor is None, else an MoE layer as `moe` describes."""
    if capacity_factor is None:
        return DenseFFN(ctx, hidden_size, ffn_hidden_size, moe.activation)
    if moe.num_experts % ctx.ep_size:
        raise ValueError(f"moe.num_experts={moe.num_experts} is not divisible by "
                         f"expert parallel size {ctx.ep_size}")
    router_cond = cond_size if moe.router_input == "timestep_and_hidden" else 0
    if moe.router == "expert_choice":
        router = ExpertChoiceRouter(hidden_size, moe.num_experts, capacity_factor, moe.pool,
                                    moe.group_size, moe.gate, moe.gate_scale, router_cond)
    else:
        router = TokenChoiceRouter(hidden_size, moe.num_experts, moe.top_k, capacity_factor,
                                   moe.pool, moe.group_size, router_cond)
    experts = GroupedExperts(moe.num_experts // ctx.ep_size, hidden_size,
                             ffn_hidden_size // ctx.expert_tp_size, moe.activation,
                             tp_group=ctx.expert_tp_group)
    # The shared expert sees the gathered sequence, so it is built without sequence parallelism.
    shared = (DenseFFN(ctx.replicated_input(), hidden_size, moe.shared_expert_size,
                       moe.activation) if moe.shared_expert_size else None)
    dispatcher = AllToAllDispatcher(ctx.ep_group) if ctx.ep_size > 1 else None
    return MoELayer(router, experts, dispatcher, shared,
                    ctx.tp_group if ctx.sequence_parallel else None, moe.aux_loss_coeff)


def set_aux_grad_scale(model: nn.Module, scale: float) -> None:
    """Scale every MoE layer's auxiliary-loss gradient (1 / micro-batches per step)."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.aux_grad_scale = scale
