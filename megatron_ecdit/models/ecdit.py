"""The EC-DiT network: a PixArt-alpha-like text-to-image DiT whose FFNs are EC-MoE layers.

    tokens = PatchEmbed(x) + pos                      image (B, C, H, W) -> (S, B, D)
    c      = TimestepEmbedder(t)                      (B, Dc), drives every adaLN
    text   = CaptionProjection(text encoder states)   (L, B, D)
    block  : x  = x + g1 * SelfAttn(mod(LN(x), c))    adaLN-Zero (DiT)
             x' = x + CrossAttn(LN(x), text, mask)    zero-initialised output (PixArt)
             x  = x' + g2 * FFN(mod(LN(x'), c))       FFN = EC-MoE on every other block
    out    = Linear(mod(LN(x), c)) -> unpatchify

The router sees the FFN input mod(LN(x')) (Algorithm 1's x_p), so the timestep reaches it only
through adaLN and the text only through the cross-attention residual. Blocks live in a
ModuleDict keyed by their global index so names survive pipeline slicing and checkpoints. The
model knows no process groups; it is handed a ParallelContext.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region,
                                                    scatter_to_sequence_parallel_region)
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_ecdit.config import ModelConfig, MoEConfig
from megatron_ecdit.models.attention import Attention
from megatron_ecdit.models.embedders import (CaptionProjection, PatchEmbed, TimestepEmbedder,
                                             sincos_pos_embed_2d, unpatchify)
from megatron_ecdit.layers.param_tags import declare_linear_init, declare_norm_init
from megatron_ecdit.layers.tensor_parallel import (ColumnLinear, ParallelContext,
                                                  SequenceParallelLayerNorm)
from megatron_ecdit.moe.layer import FFNOutput, MoELayer, RoutingStats, build_ffn


def modulate(x_SBD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    return x_SBD * (1 + scale_BD[None]) + shift_BD[None]


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(Dc, n * D), zero-initialised (adaLN-Zero), replicated output.

    Under sequence parallelism each TP rank applies the modulation to its own slice of the
    tokens, so the gradient reaching the modulation is partial: it is summed over TP on the way
    back (megatron's copy-to-TP-region), and everything upstream sees the full gradient."""

    def __init__(self, ctx: ParallelContext, cond_size: int, hidden_size: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = ColumnLinear(ctx.replicated_input(), cond_size, chunks * hidden_size,
                                   gather_output=True, init_std=0.0)
        self.sp_group = ctx.tp_group if ctx.sequence_parallel else None

    def forward(self, c_BDc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.linear(nn.functional.silu(c_BDc))
        if self.sp_group is not None:
            out = copy_to_tensor_model_parallel_region(out, group=self.sp_group)
        return out.chunk(self.chunks, dim=-1)


class ECDiTBlock(nn.Module):
    def __init__(self, ctx: ParallelContext, model: ModelConfig, moe: MoEConfig,
                 capacity_factor: Optional[float]):
        super().__init__()
        d = model.hidden_size
        self.router_reads_hidden = moe.router_input == "timestep_and_hidden"
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(ctx, d, model.num_heads, model.num_kv_heads)
        self.norm_cross = SequenceParallelLayerNorm(ctx, d, eps=1e-6)
        declare_norm_init(self.norm_cross)
        self.cross_attn = Attention(ctx, d, model.num_heads, model.num_kv_heads, cross=True,
                                    zero_out=True)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ffn = build_ffn(ctx, d, model.ffn_size, moe, capacity_factor, model.cond_size)
        self.modulation = AdaLNModulation(ctx, model.cond_size, d, 6)
        self.recompute = ctx.recompute

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x_SBD: torch.Tensor, c_BDc: torch.Tensor, text_LBD: torch.Tensor,
                text_mask_BL: torch.Tensor) -> tuple[torch.Tensor, FFNOutput]:
        # Recompute keeps only the inputs and reruns in backward (torch's non-reentrant
        # checkpoint: any outputs, and the collectives of TP/SP/EP simply run again).
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x_SBD, c_BDc, text_LBD, text_mask_BL,
                              use_reentrant=False)
        return self._forward(x_SBD, c_BDc, text_LBD, text_mask_BL)

    def _forward(self, x_SBD: torch.Tensor, c_BDc: torch.Tensor, text_LBD: torch.Tensor,
                 text_mask_BL: torch.Tensor) -> tuple[torch.Tensor, FFNOutput]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c_BDc)
        x_SBD = x_SBD + gate1[None] * self.self_attn(modulate(self.norm1(x_SBD), shift1, scale1))
        x_SBD = x_SBD + self.cross_attn(self.norm_cross(x_SBD), text_LBD, text_mask_BL)
        normed = self.norm2(x_SBD)
        ffn_inputs = (modulate(normed, shift2, scale2),
                      normed if self.router_reads_hidden else None, c_BDc)
        if self.recompute == "moe_only" and self.is_moe and torch.is_grad_enabled():
            ffn = checkpoint(self.ffn, *ffn_inputs, use_reentrant=False)
        else:
            ffn = self.ffn(*ffn_inputs)
        return x_SBD + gate2[None] * ffn.output, ffn


class FinalLayer(nn.Module):
    def __init__(self, ctx: ParallelContext, model: ModelConfig):
        super().__init__()
        d, p = model.hidden_size, model.patch_size
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        # The final layer sees the whole (gathered) sequence even under sequence parallelism.
        self.modulation = AdaLNModulation(ctx.replicated_input(), model.cond_size, d, 2)
        self.linear = nn.Linear(d, p * p * model.in_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        declare_linear_init(self.linear, 0.0)

    def forward(self, x_SBD: torch.Tensor, c_BDc: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c_BDc)
        return self.linear(modulate(self.norm(x_SBD), shift, scale))  # (S, B, p*p*C)


@dataclass
class ECDiTOutput:
    prediction: torch.Tensor  # velocity (B, C, H, W), or token rows (B, S_keep, p*p*C) if masked
    routing: dict[int, RoutingStats] = field(default_factory=dict)  # by block index


class ECDiT(nn.Module):
    """The network, or one pipeline stage of it.

    A stage holds the blocks in `layers` (global indices, so parameter names are the same at any
    layout), the patch embedding only if it is the first stage (`pre_process`) and the final
    layer only if it is the last (`post_process`). The conditioning embedders are replicated on
    every stage: each stage recomputes the timestep and caption conditioning from the batch,
    and only hidden states travel between stages. Parameters of those replicas are tagged
    `pipeline_parallel` (megatron-core's finalize_model_grads sums their gradients over the
    pipeline group, as for NeMo's DiT) and, off the first stage, `shared` (counted once in the
    gradient norm).
    """

    # Read by megatron-core's pipeline schedules and finalize_model_grads.
    model_type = ModelType.encoder_or_decoder
    share_embeddings_and_output_weights = False

    def __init__(self, model: ModelConfig, moe: MoEConfig, ctx: Optional[ParallelContext] = None,
                 *, layers: Optional[range] = None, pre_process: bool = True,
                 post_process: bool = True):
        super().__init__()
        ctx = ctx or ParallelContext()
        model.validate()
        moe.validate(model.num_layers)
        self.model_config = model
        self.pre_process, self.post_process = pre_process, post_process
        layers = range(model.num_layers) if layers is None else layers
        whole = pre_process and post_process and len(layers) == model.num_layers
        d = model.hidden_size
        if pre_process:
            self.patch_embed = PatchEmbed(model.in_channels, model.patch_size, d)
            grid = model.input_size // model.patch_size
            self.register_buffer("pos_embed", sincos_pos_embed_2d(d, grid), persistent=False)
        self.t_embedder = TimestepEmbedder(model.cond_size)
        self.caption_proj = CaptionProjection(model.text_dim, d)
        if not whole:
            for module in (self.t_embedder, self.caption_proj):
                for p in module.parameters():
                    p.pipeline_parallel = True
                    p.shared = not pre_process
        moe_layers = moe.moe_layer_indices(model.num_layers)
        self.blocks = nn.ModuleDict({
            str(i): ECDiTBlock(ctx, model, moe, moe.capacity_factor_of(moe_layers.index(i))
                               if i in moe_layers else None)
            for i in layers})
        if post_process:
            self.final = FinalLayer(ctx, model)
        self.sp_group = ctx.tp_group if ctx.sequence_parallel else None
        self.input_tensor: Optional[torch.Tensor] = None

    def set_input_tensor(self, tensor) -> None:
        """Called by megatron-core's pipeline schedules with the previous stage's output."""
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def forward(self, x_BCHW: Optional[torch.Tensor], t_B: torch.Tensor, text_BLT: torch.Tensor,
                text_mask_BL: torch.Tensor, keep_idx_BK: Optional[torch.Tensor] = None
                ) -> ECDiTOutput:
        """keep_idx_BK: MaskDiT-style subset of token positions to process (training only).
        Off the last pipeline stage the prediction is the hidden state (S, B, D) to send on.

        Inputs are cast to the parameters' dtype and the last stage's prediction is fp32
        (megatron's Float16Module), so callers see the same tensors in fp32 and bf16."""
        dtype = self.caption_proj.fc1.weight.dtype  # the compute dtype (train.precision)
        if self.pre_process:
            x_BCHW = x_BCHW.to(dtype)
            x_BSD = self.patch_embed(x_BCHW) + self.pos_embed.to(dtype)
            if keep_idx_BK is not None:
                x_BSD = torch.gather(x_BSD, 1,
                                     keep_idx_BK[..., None].expand(-1, -1, x_BSD.shape[-1]))
            x_SBD = x_BSD.transpose(0, 1).contiguous()
            if self.sp_group is not None:  # each TP rank keeps its slice of the sequence
                x_SBD = scatter_to_sequence_parallel_region(x_SBD, group=self.sp_group)
        else:
            x_SBD = self.input_tensor
        c_BDc = self.t_embedder(t_B)
        text_LBD = self.caption_proj(text_BLT.to(dtype)).transpose(0, 1)
        routing: dict[int, RoutingStats] = {}
        for name, block in self.blocks.items():
            x_SBD, ffn = block(x_SBD, c_BDc, text_LBD, text_mask_BL)
            if ffn.stats is not None:
                routing[int(name)] = ffn.stats
        if not self.post_process:  # sent to the next stage, which needs a contiguous tensor
            return ECDiTOutput(x_SBD.contiguous(), routing)
        if self.sp_group is not None:
            x_SBD = gather_from_sequence_parallel_region(x_SBD, tensor_parallel_output_grad=False,
                                                         group=self.sp_group)
        rows_BSP = self.final(x_SBD, c_BDc).transpose(0, 1).float()
        if keep_idx_BK is not None:
            return ECDiTOutput(rows_BSP, routing)
        return ECDiTOutput(unpatchify(rows_BSP, self.model_config.patch_size,
                                     self.model_config.in_channels),
                           routing)


def stage_layers(num_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> range:
    """Blocks of model chunk `chunk` on pipeline rank `pp_rank` (megatron-core's interleaved
    order: chunk v of rank r holds the (v * pp + r)-th run of num_layers / (pp * vpp) blocks)."""
    per_chunk = num_layers // (pp * vpp)
    start = (chunk * pp + pp_rank) * per_chunk
    return range(start, start + per_chunk)


def stage_chunks(model: ModelConfig, moe: MoEConfig, ctx: ParallelContext, pp: int, vpp: int,
                 pp_rank: int) -> list[ECDiT]:
    """The model chunks of pipeline rank `pp_rank`: one per virtual stage, the patch embedding
    on the very first and the final layer on the very last."""
    return [ECDiT(model, moe, ctx, layers=stage_layers(model.num_layers, pp, vpp, pp_rank, v),
                  pre_process=pp_rank == 0 and v == 0,
                  post_process=pp_rank == pp - 1 and v == vpp - 1)
            for v in range(vpp)]
