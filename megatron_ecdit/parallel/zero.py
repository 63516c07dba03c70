"""Data parallelism with ZeRO: one adapter per backend, the same four calls for the loop.

Backends: megatron-core's DDP + DistributedOptimizer (`MegatronZeRO`) and DeepSpeed ZeRO stages
1-3 (`DeepSpeedZeRO`). The loop sees `module`, `zero_grad()`, `backward(loss)` and
`step(lr) -> grad norm`, never the backend.

`MegatronZeRO` wraps each model chunk (one, or several under virtual pipelining) in
megatron-core's DistributedDataParallel (contiguous grad buffers; dense grads reduced over DP,
expert grads over expert-DP, sequence-parallel norm grads over TP by `finalize_model_grads`)
and builds megatron-core's optimizer: the distributed optimizer (ZeRO-1: fp32 master weights and
Adam state sharded over DP) for zero_stage 1, or the replicated one for zero_stage 0. Gradients
of the conditioning embedders replicated on every pipeline stage (tagged `pipeline_parallel`)
are summed over the pipeline group by the same finalize_model_grads (`has_cond_embedder`), so
every replica takes the same step. The training loop sees only `zero_grad`, `step` and
`module` (`modules` for all chunks).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig
from torch import nn

from megatron_ecdit.config import ModelConfig, MoEConfig, OptimConfig
from megatron_ecdit.models.ecdit import ECDiTBlock
from megatron_ecdit.models.tensor_parallel import ParallelContext
from megatron_ecdit.parallel.layout import ParallelLayout
from megatron_ecdit.training.optim import initialise_state


def transformer_config(model: ModelConfig, moe: MoEConfig, ctx: ParallelContext,
                       layout: ParallelLayout) -> TransformerConfig:
    """The megatron-core config its DDP and optimizer read (dims and parallel degrees)."""
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_heads, num_query_groups=model.num_kv_heads,
        tensor_model_parallel_size=layout.tp, sequence_parallel=layout.sp,
        pipeline_model_parallel_size=layout.pp, expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp, num_moe_experts=moe.num_experts or None,
        use_cpu_initialization=ctx.mp_config.use_cpu_initialization,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, add_bias_linear=False, pipeline_dtype=torch.float32,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        batch_p2p_comm=False)  # batched p2p over gloo gives wrong gradients (measured)


class MegatronZeRO:
    def __init__(self, model: nn.Module | list[nn.Module], model_cfg: ModelConfig,
                 moe: MoEConfig, optim: OptimConfig, ctx: ParallelContext,
                 layout: ParallelLayout):
        if optim.name != "adamw":
            raise ValueError("the megatron ZeRO backend supports optim.name=adamw")
        self.checkpoint_format = f"megatron-zero{layout.zero_stage}"
        self.config = transformer_config(model_cfg, moe, ctx, layout)
        # `pipeline_parallel` grads are summed over the pipeline by _sum_replicated_embedder_grads,
        # not by finalize_model_grads (which would sum after the data-parallel reduce-scatter).
        self.config.has_cond_embedder = False
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=layout.zero_stage >= 1,
            overlap_grad_reduce=False, overlap_param_gather=False)
        chunks = model if isinstance(model, list) else [model]
        self.modules = [DistributedDataParallel(self.config, ddp_config, chunk)
                        for chunk in chunks]
        self.module = self.modules[0]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr,
                            weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
                            adam_beta2=optim.betas[1], adam_eps=optim.eps,
                            clip_grad=optim.grad_clip, bf16=False, params_dtype=torch.float32,
                            use_distributed_optimizer=layout.zero_stage >= 1),
            self.modules)

    def zero_grad(self) -> None:
        for module in self.modules:
            module.zero_grad_buffer()
        self.optimizer.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
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
        self._sum_replicated_embedder_grads()
        finalize_model_grads(self.modules)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        _, grad_norm, _ = self.optimizer.step()
        return float(grad_norm)

    def sharded_state_dict(self, model_state: dict, is_loading: bool) -> dict:
        """megatron-core's own, per distributed optimizer (dense, and experts), in its
        'fully_reshardable' form: the fp32 master weights and Adam moments gathered over DP and
        described like the parameters (model space), so any layout can load them.

        Two repairs for megatron-core 0.16 without Apex or Transformer Engine: its state_dict
        reads the Adam step from torch's per-parameter state, so a fresh optimizer gets its
        state created first; and an optimizer without parameters on this rank (the experts' on
        a pipeline stage without MoE blocks) cannot describe itself, so it is left out."""
        state = {}
        for index, optimizer in enumerate(self._optimizers()):
            if not any(group["params"] for group in optimizer.optimizer.param_groups):
                continue
            initialise_state(optimizer.optimizer)  # before the first step there is none yet
            state[index] = optimizer.sharded_state_dict(
                model_state, is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        return state

    def load_state_dict(self, state: dict, step: int) -> None:
        """megatron-core's load, repaired: its fully-reshardable reader skips torch Adam's
        per-parameter `step` but then expects it among the tensors to fill (KeyError). So each
        distributed optimizer loads its groups first (rank 0's, or its own where rank 0 had
        none), then its parameter state with `step` set aside; `step` is restored from the
        checkpoint's step as one tensor per parameter (megatron-core would hand every
        parameter the same tensor, which torch's Adam then advances once per parameter)."""
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
                    param_state_.pop("step", None)
                optimizer.load_parameter_state_from_fully_reshardable(param_state)
            for param_state_ in optimizer.optimizer.state.values():
                param_state_["step"] = torch.tensor(float(step))

    def _optimizers(self) -> list:
        """megatron-core's optimizers: one per parameter kind (dense, experts)."""
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))


class _MegatronMpu:
    """megatron-core's parallel_state under the names DeepSpeed asks an `mpu` for: its "model
    parallel" group is our tensor-parallel group (pipelining is not combined with DeepSpeed)."""

    def __getattr__(self, name: str):
        return getattr(parallel_state, name)

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()


def _deepspeed_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict,
                      expert_group: str | None):
    """`deepspeed.initialize` for a non-pipeline model, with one difference: when
    `expert_group` names expert-parallel parameters, the engine is told the model has MoE
    layers. DeepSpeed recognises only its own MoE modules; the flag makes its ZeRO optimizer
    partition and reduce each expert parameter group over that group's expert-DP group."""
    import deepspeed
    from deepspeed import comm
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    if expert_group is None:
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                    mpu=_MegatronMpu(), dist_init_required=False)[0]

    class ExpertParallelEngine(DeepSpeedEngine):
        def _configure_distributed_model(self, module):
            super()._configure_distributed_model(module)
            self.has_moe_layers = True

    comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                          dist_init_required=False)
    mpu = _MegatronMpu()
    return ExpertParallelEngine(args=None, model=model, optimizer=optimizer, mpu=mpu,
                                dist_init_required=False, config=config,
                                config_class=DeepSpeedConfig(config, mpu))


def _register_expert_groups(name: str) -> None:
    """Hand megatron-core's expert-parallel and expert-DP groups to DeepSpeed under `name`, so
    both libraries use the groups the EC layer's all-to-all runs over. DeepSpeed keeps them in
    module dictionaries of `deepspeed.utils.groups` (its MoE layer fills them the same way)."""
    from deepspeed.utils import groups

    for kind, group in (("PARALLEL", parallel_state.get_expert_model_parallel_group()),
                        ("DATA_PARALLEL", parallel_state.get_expert_data_parallel_group())):
        groups_of = getattr(groups, f"_EXPERT_{kind}_GROUP")
        ranks_of = getattr(groups, f"_EXPERT_{kind}_GROUP_RANKS")
        groups_of[name] = group
        ranks_of[name] = torch.distributed.get_process_group_ranks(group)


class DeepSpeedZeRO:
    """DeepSpeed ZeRO stage 1, 2 or 3 over the data-parallel group, with a torch AdamW as the
    client optimizer (no fused-Adam build) and DeepSpeed's gradient clipping. With expert
    parallelism (ZeRO-1/2), the expert weights form DeepSpeed MoE parameter groups that are
    partitioned and reduced over megatron-core's expert-DP group."""

    def __init__(self, model: nn.Module, optim: OptimConfig, layout: ParallelLayout,
                 micro_batch_size: int):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        if optim.name != "adamw":
            raise ValueError("the DeepSpeed backend supports optim.name=adamw")
        # DeepSpeed reads `allreduce = False` as "an expert parameter of group `group_name`".
        # Without expert parallelism our experts are ordinary data-parallel parameters.
        expert_group = f"ep_size_{layout.ep}" if layout.ep > 1 else None
        for p in model.parameters():
            if getattr(p, "allreduce", True) is False:
                if expert_group is None:
                    p.allreduce = True
                else:
                    p.group_name = expert_group
        if expert_group is not None:
            _register_expert_groups(expert_group)
        if layout.zero_stage == 3:
            # ZeRO-3 gathers a module's partitioned parameters for backward from hooks on the
            # tensors the module returns. The FFN and router return dataclasses, which those
            # hooks do not see, so each block also claims every parameter inside it: they are
            # gathered when the gradient reaches the block's output.
            from deepspeed.runtime.zero import register_external_parameter

            for block in model.modules():
                if isinstance(block, ECDiTBlock):
                    for p in block.parameters():
                        register_external_parameter(block, p)
        param_groups = [{"name": "dense", "params": list(model.parameters())}]
        if expert_group is not None:
            param_groups = split_params_into_different_moe_groups_for_optimizer(param_groups)
        optimizer = torch.optim.AdamW(param_groups, lr=optim.lr,
                                      betas=tuple(optim.betas), eps=optim.eps,
                                      weight_decay=optim.weight_decay)
        config = {"train_micro_batch_size_per_gpu": micro_batch_size,
                  "gradient_accumulation_steps": 1,
                  "gradient_clipping": optim.grad_clip,
                  "zero_optimization": {"stage": layout.zero_stage},
                  "steps_per_print": 2**31 - 1}
        self.engine = _deepspeed_engine(model, optimizer, config, expert_group)
        self.module = self.engine

    def zero_grad(self) -> None:
        pass  # the engine clears gradients in step()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def reload_model_params(self) -> None:
        """After the parameters were overwritten (a load): DeepSpeed steps its own fp32
        partitions and copies them back into the parameters, so each rank's partition is set
        from the loaded values (under ZeRO-3 from the gathered parameter)."""
        from deepspeed.utils import safe_set_full_fp32_param

        for param in self.engine.module.parameters():
            with self._gathered([param]):
                safe_set_full_fp32_param(param, param.detach().float())

    def _gathered(self, params: list):
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed
            return deepspeed.zero.GatheredParameters(params)
        return contextlib.nullcontext()

    def step(self, lr: float) -> float:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    _STATE = ("fp32_param", "exp_avg", "exp_avg_sq")
    checkpoint_format = "deepspeed-zero"  # stages 1 and 2 alike: full tensors per parameter

    def sharded_state_dict(self, model_state: dict, is_loading: bool) -> dict:
        """The fp32 master weights and Adam moments of every parameter, gathered over the
        data-parallel group by DeepSpeed's own accessors and described in model space like
        the parameter (collective). Both backends thus write the same optimizer tensors."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        zero = self.engine.optimizer
        initialise_state(zero.optimizer)  # DeepSpeed creates Adam's state at the first step
        # DeepSpeed links each parameter to its Adam state once, right after stepping the
        # first parameter group, so later groups (the expert groups) link to an empty state;
        # link again now that every group has its state.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
        state = {}
        for entry, sh in model_state.items():
            for key in self._STATE:
                if is_loading:
                    value = torch.empty_like(sh.data, dtype=torch.float32)
                elif key == "fp32_param":
                    value = safe_get_full_fp32_param(sh.data)
                else:
                    value = safe_get_full_optimizer_state(sh.data, key)
                state[f"{key}/{entry}"] = dataclasses.replace(
                    sh, key=f"optimizer.state.{key}.{sh.key}", data=value, dtype=value.dtype)
        self._params = {entry: sh.data for entry, sh in model_state.items()}
        return state

    def load_state_dict(self, state: dict, step: int) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        for name, value in state.items():
            key, entry = name.split("/", 1)
            param = self._params[entry]
            if key == "fp32_param":
                safe_set_full_fp32_param(param, value)
            else:
                safe_set_full_optimizer_state(param, value, key)
        for param_state in self.engine.optimizer.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = torch.full_like(torch.as_tensor(param_state["step"]),
                                                      float(step))
