"""EC-DiT as a diffusers model: `ECDiTTransformer2DModel`.

It *is* the project's network (`models.ecdit.ECDiT`, subclassed: the same parameters, names and
forward), registered with diffusers' config system. Its `config.json` holds the model and MoE
sections of a run flat (`config.transformer_kwargs`), so `from_pretrained` reads the folder
`ecdit-convert export` writes (or the `transformer/` subfolder of an exported pipeline), shard
by shard, and `save_pretrained` writes one as diffusers shards it. The run's whole config and
what the export was made from travel in the config's private `_ecdit` entry, which diffusers
keeps through a round trip.

The forward takes diffusers' argument names, with the timestep t in [0, 1] (the rectified
flow's noise level, FlowMatchEulerDiscreteScheduler's sigma), and returns the predicted
velocity as `Transformer2DModelOutput.sample`. It runs in a plain process (no
torch.distributed); sampling at a parallel layout is `ecdit-sample`'s. A new instance's weights
are left uninitialised: the class is made to be loaded with `from_pretrained`.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from megatron_ecdit.config import ModelConfig as _M
from megatron_ecdit.config import MoEConfig as _E
from megatron_ecdit.config import from_transformer_kwargs
from megatron_ecdit.layers.tensor_parallel import ParallelContext
from megatron_ecdit.models.ecdit import ECDiT


class ECDiTTransformer2DModel(ECDiT, ModelMixin, ConfigMixin):
    _no_split_modules = ["ECDiTBlock"]

    @register_to_config
    def __init__(self, hidden_size: int = _M.hidden_size, num_layers: int = _M.num_layers,
                 num_heads: int = _M.num_heads, num_kv_heads: int = _M.num_kv_heads,
                 cond_dim: Optional[int] = _M.cond_dim,
                 ffn_hidden_size: Optional[int] = _M.ffn_hidden_size,
                 in_channels: int = _M.in_channels, input_size: int = _M.input_size,
                 patch_size: int = _M.patch_size, text_dim: int = _M.text_dim,
                 num_experts: int = _E.num_experts, router: str = _E.router,
                 capacity_factor: float = _E.capacity_factor,
                 moe_layers: Optional[list[int]] = _E.layers,
                 layer_capacity_factors: Optional[list[float]] = _E.layer_capacity_factors,
                 pool: str = _E.pool, group_size: int = _E.group_size, gate: str = _E.gate,
                 gate_scale: float = _E.gate_scale, router_input: str = _E.router_input,
                 activation: str = _E.activation, shared_expert_size: int = _E.shared_expert_size,
                 top_k: int = _E.top_k, aux_loss_coeff: float = _E.aux_loss_coeff):
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        model, moe = from_transformer_kwargs(arguments)
        # No initialisation: from_pretrained overwrites every weight.
        ECDiT.__init__(self, model, moe, ParallelContext.meta())

    def state_dict(self, *args, **kwargs):
        """The weights. megatron-core's linear layers add an `_extra_state` entry each (for
        Transformer Engine's fp8 state), None here: left out, as diffusers stores tensors."""
        state = super().state_dict(*args, **kwargs)
        for key in [k for k, v in state.items() if k.endswith("._extra_state") and v is None]:
            del state[key]
        return state

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                return_dict: bool = True):
        """hidden_states (B, C, H, W) at noise level timestep (B,) in [0, 1]; the text
        encoder's states (B, L, text_dim) with their mask (B, L), True = a real token."""
        out = ECDiT.forward(self, hidden_states, timestep, encoder_hidden_states,
                            encoder_attention_mask)
        if not return_dict:
            return (out.prediction,)
        return Transformer2DModelOutput(sample=out.prediction)
