"""Data parallelism through DeepSpeed ZeRO stages 1-3, with megatron-core's groups.

`DeepSpeedZeRO` hands DeepSpeed's engine the one-process backend's torch optimizer (AdamW or
RMSprop, `optim.name`; no fused-Adam build) over the same weight-decay groups, megatron's
tensor-parallel group as its `mpu`, and with expert parallelism (ZeRO-1/2) the expert weights as
DeepSpeed MoE parameter groups, partitioned and reduced over megatron-core's expert-DP group.

Under ZeRO-3 each parameter lives as a flat partition per data-parallel rank (`param.ds_tensor`,
rank r holding elements [r n, (r + 1) n) of the flattened tensor, zero-padded at the end);
`local`, `to_full` and `to_local` translate between that and whole tensors, and `gathered`
makes every parameter whole for a save or a load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import ContextManager, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import nn

from megatron_ecdit.config import OptimConfig
from megatron_ecdit.models.ecdit import ECDiTBlock
from megatron_ecdit.parallel.backends.one_process import (format_suffix, initialise_state,
                                                           param_groups, state_names,
                                                           torch_optimizer)
from megatron_ecdit.parallel.layout import ParallelLayout


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
    """DeepSpeed ZeRO stage 1, 2 or 3 over the data-parallel group, with a torch AdamW or
    RMSprop as the client optimizer (no fused-Adam build) and DeepSpeed's gradient clipping. With expert
    parallelism (ZeRO-1/2), the expert weights form DeepSpeed MoE parameter groups that are
    partitioned and reduced over megatron-core's expert-DP group. Stages 1 and 2 keep the
    parameters whole; stage 3 partitions them (see the module's docstring)."""

    def __init__(self, model: nn.Module, optim: OptimConfig, layout: ParallelLayout,
                 micro_batch_size: int, num_microbatches: int = 1):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

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
        # The one-process backend's groups (weight decay on matrices only) and optimizer, in
        # torch's per-tensor loop (its choice for CPU tensors; DeepSpeed steps flat partitions).
        groups = [dict(group, name=name) for group, name in
                  zip(param_groups(list(model.parameters()), optim.weight_decay),
                      ("decay", "no_decay"))]
        if expert_group is not None:
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        optimizer = torch_optimizer(dataclasses.replace(optim, implementation="for_loop"),
                                    [group for group in groups if group["params"]])
        self._state_names = ("fp32_param", *state_names(optim))
        self.checkpoint_format = "deepspeed-zero" + format_suffix(optim)
        config = {"train_micro_batch_size_per_gpu": micro_batch_size,
                  "gradient_accumulation_steps": num_microbatches,
                  "gradient_clipping": optim.grad_clip,
                  # memory_efficient_linear (ZeRO-3) would replace torch.nn.functional.linear
                  # for the whole process, for good: every later linear, the text encoder's
                  # and a later job's, would round differently (matmul, then the bias)
                  "zero_optimization": {"stage": layout.zero_stage,
                                        "overlap_comm": layout.overlap_grad_reduce,
                                        "memory_efficient_linear": False},
                  "steps_per_print": 2**31 - 1,
                  # DeepSpeed vouches for its Adam family only; RMSprop's ZeRO runs equal one
                  # process and resume bit for bit (tests/test_entry_point.py)
                  "zero_allow_untested_optimizer": optim.name != "adamw"}
        if next(model.parameters()).dtype == torch.bfloat16:
            # train.precision=bf16: DeepSpeed keeps fp32 master partitions and optimizer state;
            # gradients accumulate in fp32 (ZeRO-1 then runs as DeepSpeed's BF16_Optimizer).
            config["bf16"] = {"enabled": True}
            config["data_types"] = {"grad_accum_dtype": "fp32"}
        self.engine = _deepspeed_engine(model, optimizer, config, expert_group)
        self.module = self.engine
        self.modules = [self.engine]
        self.num_microbatches = num_microbatches
        self._backwards = 0  # micro-batches since the last step
        self.partitioned = layout.zero_stage == 3

    def zero_grad(self) -> None:
        pass  # the engine clears gradients in step()

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward. The loop has already divided the loss by the number of
        micro-batches, so DeepSpeed must not divide again (scale_wrt_gas=False); the last
        micro-batch of a step is the accumulation boundary, where ZeRO reduces the gradients."""
        self._backwards += 1
        self.engine.set_gradient_accumulation_boundary(
            self._backwards == self.num_microbatches)
        self.engine.backward(loss, scale_wrt_gas=False)

    def reload_model_params(self) -> None:
        """After the parameters were overwritten (a load): DeepSpeed steps its own fp32
        partitions and copies them back into the parameters, so each rank's fp32 partition is
        set from the loaded values (outside `gathered`: under ZeRO-3 from the partition)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        for param in self.engine.module.parameters():
            if self.partitioned:
                safe_set_local_fp32_param(param, param.ds_tensor.detach().float())
            else:
                safe_set_full_fp32_param(param, param.detach().float())

    # ------------------------------------------------------------ where the weights live

    def gathered(self, modify: bool = False) -> ContextManager[None]:
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed
        # Every rank writes the same values when it modifies (a load), so rank 0's are kept.
        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()),
                                                 modifier_rank=0 if modify else None)

    def local(self, param: nn.Parameter) -> torch.Tensor:
        return param.ds_tensor if self.partitioned else param

    def to_full(self, param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
        if not self.partitioned:
            return local
        group = param.ds_process_group
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)[:param.ds_numel].view(param.ds_shape)

    def to_local(self, param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        if not self.partitioned:
            return full
        n = param.ds_tensor.numel()
        start = dist.get_rank(param.ds_process_group) * n
        mine = full.reshape(-1)[start:start + n]
        return F.pad(mine, (0, n - mine.numel()))

    def step(self, lr: float) -> float:
        if self._backwards != self.num_microbatches:
            raise RuntimeError(f"DeepSpeed step after {self._backwards} of "
                               f"{self.num_microbatches} micro-batches")
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()  # skips the update itself when its gradient norm is not finite
        self._backwards = 0
        norm = self.engine.get_global_grad_norm()
        if not self.engine.was_step_applied():  # (its norm may then read -1 or inf)
            return math.nan
        return float(norm) if norm is not None else math.nan

    checkpoint_format: str  # every stage alike: full tensors per parameter
    optimizer_layout = None  # model space: loads at any layout

    def sharded_state_dict(self, model_state: dict, is_loading: bool,
                           sharding: Optional[str] = None) -> dict:
        """The fp32 master weights and optimizer moments of every parameter, gathered over the
        data-parallel group by DeepSpeed's own accessors and described in model space like
        the parameter (collective; under ZeRO-3 inside `gathered`, where `model_state`
        describes whole parameters). Both backends thus write the same optimizer tensors."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._initialise_state()
        state = {}
        for entry, sh in model_state.items():
            for key in self._state_names:
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

    def _initialise_state(self) -> None:
        """The optimizer's state exists only after DeepSpeed's first step; create it now (no-op if it
        exists) so that it can be saved or loaded into."""
        zero = self.engine.optimizer
        if self.partitioned:
            # ZeRO-3 hands its torch optimizer the flat fp32 partitions only during step().
            groups = zero.optimizer.param_groups
            for sub_group, flat in enumerate(zero.fp32_partitioned_groups_flat):
                groups[zero.sub_group_to_group_id[sub_group]]["params"].append(flat)
            initialise_state(zero.optimizer)
            for group in groups:
                group["params"] = []
            return
        initialise_state(zero.optimizer)
        # DeepSpeed links each parameter to its optimizer state once, right after stepping the
        # first parameter group, so later groups (the expert groups) link to an empty state;
        # link again now that every group has its state.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

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
