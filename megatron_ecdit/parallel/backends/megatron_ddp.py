"""Data parallelism through megatron-core: DDP + the distributed optimizer (ZeRO-1).

`MegatronZeRO` wraps each model chunk (one, or several under virtual pipelining) in
megatron-core's DistributedDataParallel (contiguous grad buffers; dense grads reduced over DP,
expert grads over expert-DP, sequence-parallel norm grads over TP by `finalize_model_grads`)
and builds megatron-core's optimizer: the distributed optimizer (ZeRO-1: fp32 master weights and
AdamW or RMSprop state sharded over DP) for zero_stage 1, or the replicated one for zero_stage
0. Gradients of the conditioning embedders replicated on every pipeline stage (tagged
`pipeline_parallel`) are summed over the pipeline group before the data-parallel reduction, so
every replica takes the same step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.transformer import TransformerConfig
from torch import nn

from megatron_ecdit.config import ModelConfig, MoEConfig, OptimConfig
from megatron_ecdit.layers.tensor_parallel import ParallelContext
from megatron_ecdit.parallel.backends import WholeParameters
from megatron_ecdit.parallel.backends.one_process import (format_suffix, initialise_state,
                                                         state_names, torch_optimizer)
from megatron_ecdit.parallel.layout import ParallelLayout


def transformer_config(model: ModelConfig, moe: MoEConfig, ctx: ParallelContext,
                       layout: ParallelLayout, dtype: torch.dtype = torch.float32
                       ) -> TransformerConfig:
    """The megatron-core config its DDP, optimizer and pipeline schedules read (dims, parallel
    degrees, and `dtype`: the parameters' and the hidden states' sent between stages)."""
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_heads, num_query_groups=model.num_kv_heads,
        tensor_model_parallel_size=layout.tp, sequence_parallel=layout.sp,
        pipeline_model_parallel_size=layout.pp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp, num_moe_experts=moe.num_experts or None,
        use_cpu_initialization=ctx.mp_config.use_cpu_initialization,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, add_bias_linear=False, pipeline_dtype=dtype,
        params_dtype=dtype, bf16=dtype == torch.bfloat16,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        batch_p2p_comm=False)  # batched p2p over gloo gives wrong gradients (measured)


def _swapped(adam: torch.optim.Optimizer, optim: OptimConfig) -> torch.optim.Optimizer:
    """The one process's torch optimizer for `optim` over the parameter groups megatron-core
    built for `adam` (its main-weight shards, with their weight decay). The groups are handed
    over as the distributed optimizer hands its shards to Adam: assigned, since the shards
    of fp32 parameters are views, which torch refuses to take as parameters."""
    swapped = torch_optimizer(optim, [{"params": []}])
    for group in adam.param_groups:
        group.update({k: v for k, v in swapped.defaults.items() if k not in ("lr", "weight_decay")})
    swapped.param_groups = adam.param_groups
    return swapped


class MegatronZeRO(WholeParameters):
    def __init__(self, model: nn.Module | list[nn.Module], model_cfg: ModelConfig,
                 moe: MoEConfig, optim: OptimConfig, ctx: ParallelContext,
                 layout: ParallelLayout, num_microbatches: int = 1):
        chunks = model if isinstance(model, list) else [model]
        # bf16 parameters (train.precision=bf16): megatron-core's mixed precision, fp32 main
        # weights and Adam state in the optimizer and fp32 gradient buffers (grad_reduce_in_fp32).
        dtype = next(chunks[0].parameters()).dtype
        bf16 = dtype == torch.bfloat16
        self.checkpoint_format = (f"megatron-zero{layout.zero_stage}" + ("-bf16" if bf16 else "")
                                  + format_suffix(optim))
        # What dp_reshardable optimizer state is tied to: the buffers' structure, which the
        # model-parallel degrees and the gradient buckets decide (not the data-parallel size).
        self.optimizer_layout = (f"TP{layout.tp} PP{layout.pp} VPP{layout.vpp} EP{layout.ep} "
                                 f"ETP{layout.etp}, "
                                 f"{'bucketed' if layout.overlap_grad_reduce else 'one'} "
                                 "gradient buffer per dtype")
        self.config = transformer_config(model_cfg, moe, ctx, layout, dtype)
        # `pipeline_parallel` grads are summed over the pipeline by _sum_replicated_embedder_grads,
        # not by finalize_model_grads (which would sum after the data-parallel reduce-scatter).
        self.config.has_cond_embedder = False
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=layout.zero_stage >= 1,
            overlap_grad_reduce=layout.overlap_grad_reduce, overlap_param_gather=False)
        self.modules = [DistributedDataParallel(self.config, ddp_config, chunk)
                        for chunk in chunks]
        self.module = self.modules[0]
        # megatron-core builds Adam (or SGD) only: for RMSprop its wrappers, parameter groups
        # (weight decay on matrices only, as in one process) and main weights are built for
        # Adam, and the torch optimizer inside each is then swapped for the one process's.
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr,
                            weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
                            adam_beta2=optim.betas[1], adam_eps=optim.eps,
                            clip_grad=optim.grad_clip, bf16=bf16, params_dtype=dtype,
                            use_distributed_optimizer=layout.zero_stage >= 1),
            self.modules)
        # Weight decay as megatron-core's scheduler sets it, which this loop does not run:
        # `wd_mult` 0 for biases and norms (torch gave every group the configured decay).
        for group in self.optimizer.param_groups:
            group["weight_decay"] = optim.weight_decay * group["wd_mult"]
        self._state_names = state_names(optim)
        if optim.name != "adamw":
            for chained in self._optimizers():
                chained.optimizer = _swapped(chained.optimizer, optim)
                chained.init_state_fn = lambda optimizer, config=None: initialise_state(optimizer)
        # megatron-core's distributed optimizer saves and loads its torch optimizer's state
        # under Adam's names (hard-coded); RMSprop's tensors go under them too (_alias_state).
        self._aliases = ({} if optim.name == "adamw" or layout.zero_stage == 0 else
                         dict(zip(self._state_names, ("exp_avg_sq", "exp_avg"))))
        self.num_microbatches = num_microbatches
        self._backwards = 0  # micro-batches since the last step (without pipelining)
        self._sharding = "dp_reshardable"  # of the optimizer state last described

    def zero_grad(self) -> None:
        for module in self.modules:
            module.zero_grad_buffer()
        self.optimizer.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward (without pipelining; the schedules run their own). Only
        the last micro-batch of a step reduces: with overlap_grad_reduce, its backward starts
        each bucket's reduction as soon as the bucket's gradients are complete."""
        self._backwards += 1
        if self._backwards < self.num_microbatches:
            with self.module.no_sync():
                loss.backward()
        else:
            loss.backward()

    def _sum_replicated_embedder_grads(self) -> None:
        """Sum the gradients of the conditioning embedders replicated on every pipeline stage
        (and virtual chunk) over the pipeline, before the data-parallel reduction. megatron-core
        sums them after it (`has_cond_embedder`), but with the distributed optimizer that
        reduction is a reduce-scatter whose element ownership depends on the other parameters
        of a stage's buffer: stages own different elements of the same embedder, and the sum
        mixed reduced with unreduced elements (measured: 50% off at TP2xPP2xDP2)."""
        group = parallel_state.get_pipeline_model_parallel_group()
        if group.size() == 1:
            return
        replicas: dict[str, list[torch.Tensor]] = {}
        for module in self.modules:
            for name, param in module.module.named_parameters():
                if getattr(param, "pipeline_parallel", False) and param.requires_grad:
                    replicas.setdefault(name, []).append(param.main_grad)
        if not replicas:
            return
        sums = [torch.stack(grads).sum(0) for grads in replicas.values()]
        flat = torch.cat([s.reshape(-1) for s in sums])
        torch.distributed.all_reduce(flat, group=group)
        offset = 0
        for grads, total in zip(replicas.values(), sums):
            for grad in grads:
                grad.copy_(flat[offset:offset + total.numel()].view_as(grad))
            offset += total.numel()

    def reload_model_params(self) -> None:
        """After the parameters were overwritten (a load): megatron-core copies them into its
        main parameters where it keeps separate ones (bf16 training); in fp32 the distributed
        optimizer's shards are views of the parameters already."""
        self.optimizer.reload_model_params()

    def step(self, lr: float) -> float:
        """Reduce grads across the groups, clip, and update; returns the global grad norm."""
        self._backwards = 0
        self._sum_replicated_embedder_grads()
        finalize_model_grads(self.modules)  # waits for the overlapped reductions
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # megatron-core's step, with its norm checked before the update: the steps of its
        # ChainedOptimizer.step, which a single optimizer's step takes too
        optimizer = self.optimizer
        if optimizer.prepare_grads():  # inf/nan found by a loss scaler (fp16 only)
            return math.nan
        grad_norm = float(optimizer.get_grad_norm())  # reduced over every rank
        if not math.isfinite(grad_norm):
            return grad_norm  # skipped (training/nonfinite.py): nothing is updated
        for chained in self._optimizers():
            if getattr(chained, "is_stub_optimizer", False):
                continue
            params = chained.get_parameters()
            if params and chained.config.clip_grad > 0.0:
                clip_grad_by_total_norm_fp32(
                    params, chained.config.clip_grad, grad_norm,
                    chained.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        optimizer.step_with_ready_grads()
        return grad_norm

    def sharded_state_dict(self, model_state: dict, is_loading: bool,
                           sharding: Optional[str] = None) -> dict:
        """megatron-core's own, per distributed optimizer (dense, and experts):
        `dp_reshardable` (the default) writes each rank's own buffers of fp32 main weights and
        Adam moments, with no gather and no copy, loadable at this layout with any
        data-parallel size; `fully_reshardable` gathers them over DP and describes them like the
        parameters (model space), so any layout can load them.

        Two repairs for megatron-core 0.16 without Apex or Transformer Engine: its state_dict
        reads the Adam step from torch's per-parameter state, so a fresh optimizer gets its
        state created first; and an optimizer without parameters on this rank (the experts' on
        a pipeline stage without MoE blocks) cannot describe itself, so it is left out."""
        state = {}
        sharding = sharding or "dp_reshardable"
        self._sharding = sharding  # what load_state_dict then receives (common.pt is rank 0's)
        for index, optimizer in enumerate(self._optimizers()):
            if not any(group["params"] for group in optimizer.optimizer.param_groups):
                continue
            initialise_state(optimizer.optimizer)  # before the first step there is none yet
            self._alias_state(optimizer.optimizer)
            state[index] = optimizer.sharded_state_dict(
                model_state, is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": sharding})
            if sharding == "dp_reshardable":  # its keys repeat per optimizer: prefixed, as
                add_prefix_for_sharding(state[index], f"chained_{index}.")  # megatron's own
        return state

    @torch.no_grad()  # the fp32 main weights are views of the parameters
    def load_state_dict(self, state: dict, step: int) -> None:
        """megatron-core's load, repaired: its readers skip torch Adam's per-parameter `step`
        but then expect it among the tensors to fill (KeyError). So each distributed optimizer
        loads its groups first (rank 0's, or its own where rank 0 had none), then its parameter
        state with `step` set aside; `step` is restored from the checkpoint's step as one
        tensor per parameter (megatron-core would hand every parameter the same tensor, which
        torch's Adam then advances once per parameter)."""
        for index, optimizer in enumerate(self._optimizers()):
            if index not in state:
                continue
            own = dict(state[index])
            param_state = own.pop("param_state", None)  # absent for zero_stage 0
            own.pop("param_state_sharding_type", None)
            for key, value in optimizer.state_dict().items():  # groups rank 0 could not save
                own.setdefault(key, value)
            optimizer.load_state_dict(own)
            if param_state is not None:
                for param_state_ in optimizer.optimizer.state.values():
                    for key in ("step", *self._aliases):  # megatron-core fills Adam's names
                        param_state_.pop(key, None)
                if self._sharding == "dp_reshardable":
                    optimizer.load_parameter_state_from_dp_reshardable(param_state)
                else:
                    optimizer.load_parameter_state_from_fully_reshardable(param_state)
            for param_state_ in optimizer.optimizer.state.values():
                param_state_["step"] = torch.tensor(float(step))
            self._alias_state(optimizer.optimizer, loaded=True)

    def _alias_state(self, optimizer: torch.optim.Optimizer, loaded: bool = False) -> None:
        """RMSprop under the distributed optimizer: each state tensor also under the Adam name
        megatron-core reads and writes (square_avg as exp_avg_sq, momentum_buffer as
        exp_avg; without momentum, a zero exp_avg that nothing uses), the same tensors, which
        RMSprop updates in place. After a load megatron-core has written Adam's names: RMSprop's
        take those tensors."""
        for param, state in optimizer.state.items():
            for name, adam in self._aliases.items():
                if loaded:
                    state[name] = state[adam]
                else:
                    state[adam] = state[name]
            if self._aliases and "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(param)

    def _optimizers(self) -> list:
        """megatron-core's optimizers: one per parameter kind (dense, experts)."""
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))
