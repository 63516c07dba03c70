"""One validated parallel layout: every degree, checked against the model and the world size.

`ParallelLayout.build(cfg, world_size)` turns the `parallel` section of a config into degrees
(TP, SP, PP, VPP, EP, expert-TP, DP, expert-DP) and the ZeRO backend, and refuses impossible
combinations before any process group or model exists, naming the constraint. It is the one
place that refuses: the backends (parallel/backends/) build whatever layout passes here. The rank grid
follows megatron-core's order (tp-cp-ep-dp-pp for experts, tp-cp-dp-pp for the rest).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

from megatron_ecdit.config import Config, ConfigError


# DeepSpeed's checkpoints go through its full-tensor accessors (parallel/backends/
# deepspeed_zero.py): 12 bytes per parameter of a rank's tensor-parallel shard at every save,
# 24 GB at this size.
DEEPSPEED_MAX_PARAMS_PER_TP_RANK = 2e9


def _trainable_params(cfg: Config) -> int:
    """The model's trainable parameters, counted on the meta device (once per model)."""
    return _count(json.dumps(dataclasses.asdict(cfg.model), sort_keys=True),
                  json.dumps(dataclasses.asdict(cfg.moe), sort_keys=True))


@functools.lru_cache(maxsize=16)
def _count(model_json: str, moe_json: str) -> int:
    import torch

    from megatron_ecdit.config import ModelConfig, MoEConfig
    from megatron_ecdit.layers.tensor_parallel import ParallelContext
    from megatron_ecdit.models.ecdit import ECDiT

    with torch.device("meta"):
        model = ECDiT(ModelConfig(**json.loads(model_json)), MoEConfig(**json.loads(moe_json)),
                      ParallelContext.meta())
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    sp: bool = False
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int = 1
    zero: str = "megatron"
    zero_stage: int = 1
    recompute: str = "none"  # activation recompute per block (parallel.activation_checkpointing)
    overlap_grad_reduce: bool = False  # gradients reduced while backward runs

    @property
    def dp(self) -> int:
        """Data-parallel degree of the dense (non-expert) parameters."""
        return self.world_size // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        """Data-parallel degree of the expert parameters (the expert-DP group)."""
        return self.world_size // (self.etp * self.ep * self.pp)

    def describe(self) -> str:
        if self.world_size == 1:
            return "one process"  # trained with a plain torch optimizer, no ZeRO
        return (f"TP{self.tp}{'+SP' if self.sp else ''} x PP{self.pp}"
                f"{f'(VPP{self.vpp})' if self.vpp > 1 else ''} x DP{self.dp}, experts EP{self.ep}"
                f" x ETP{self.etp} x EDP{self.expert_dp}, ZeRO-{self.zero_stage} ({self.zero})")

    @classmethod
    def build(cls, cfg: Config, world_size: int) -> "ParallelLayout":
        p, m, moe = cfg.parallel, cfg.model, cfg.moe
        etp = p.etp if p.etp is not None else p.tp
        for name, value in (("tp", p.tp), ("pp", p.pp), ("vpp", p.vpp), ("ep", p.ep),
                            ("etp", etp)):
            if value < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {value}")
        if world_size % (p.tp * p.pp):
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tp x "
                              f"parallel.pp = {p.tp} x {p.pp}")
        if world_size % (etp * p.ep * p.pp):
            raise ConfigError(f"world size {world_size} is not divisible by parallel.etp x "
                              f"parallel.ep x parallel.pp = {etp} x {p.ep} x {p.pp}")
        if m.num_heads % p.tp:
            raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by "
                              f"parallel.tp={p.tp}")
        if m.num_kv_heads % p.tp:
            raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} is not divisible by "
                              f"parallel.tp={p.tp}")
        if m.ffn_size % p.tp:
            raise ConfigError(f"FFN hidden size {m.ffn_size} is not divisible by "
                              f"parallel.tp={p.tp}")
        if m.num_layers % (p.pp * p.vpp):
            raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by "
                              f"parallel.pp x parallel.vpp = {p.pp} x {p.vpp}")
        if p.vpp > 1 and p.pp == 1:
            raise ConfigError("parallel.vpp > 1 needs parallel.pp > 1")
        if p.vpp > 1 and cfg.train.num_microbatches % p.pp:
            raise ConfigError(f"the interleaved pipeline schedule needs train.num_microbatches "
                              f"(= {cfg.train.num_microbatches}) to be a multiple of "
                              f"parallel.pp = {p.pp}")
        if p.sp and p.tp == 1:
            raise ConfigError("parallel.sp (sequence parallelism) needs parallel.tp > 1")
        if moe.num_experts and p.tp > 1 and etp != p.tp:
            raise ConfigError(f"parallel.etp={etp} must equal parallel.tp={p.tp}: the experts "
                              "of a TP group see the same tokens and split their hidden size")
        if p.sp and m.num_patches % p.tp:
            raise ConfigError(f"{m.num_patches} tokens per image are not divisible by "
                              f"parallel.tp={p.tp} (sequence parallelism)")
        if p.ep > 1 and moe.num_experts == 0:
            raise ConfigError("parallel.ep > 1 needs moe.num_experts > 0")
        if moe.num_experts:
            if moe.num_experts % p.ep:
                raise ConfigError(f"moe.num_experts={moe.num_experts} is not divisible by "
                                  f"parallel.ep={p.ep}")
            if m.ffn_size % etp:
                raise ConfigError(f"expert hidden size {m.ffn_size} is not divisible by "
                                  f"parallel.etp={etp}")
        if p.zero == "deepspeed":
            if p.pp > 1:
                raise ConfigError("parallel.zero=deepspeed works with parallel.pp = 1 only "
                                  "(DeepSpeed ZeRO-2/3 do not combine with pipelining)")
            if p.zero_stage not in (1, 2, 3):
                raise ConfigError(
                    f"parallel.zero_stage must be 1, 2 or 3 for DeepSpeed, got {p.zero_stage}")
            if p.ep > 1 and p.zero_stage == 3:
                raise ConfigError("parallel.zero=deepspeed with parallel.ep > 1 supports "
                                  "zero_stage 1 or 2: DeepSpeed's engine refuses expert "
                                  "parameter groups under ZeRO-3 (\"MoE not supported with "
                                  "Stage 3\"; only its AutoEP layers are); use parallel.zero="
                                  "megatron for expert parallelism with sharded optimizer state")
            params = _trainable_params(cfg)
            if params / p.tp > DEEPSPEED_MAX_PARAMS_PER_TP_RANK:
                raise ConfigError(
                    f"parallel.zero=deepspeed: {params / 1e9:.1f}B parameters are "
                    f"{params / p.tp / 1e9:.1f}B per tensor-parallel rank, above the "
                    f"{DEEPSPEED_MAX_PARAMS_PER_TP_RANK / 1e9:g}B its checkpoints scale to: every "
                    "save makes fp32 copies of the weights and both Adam moments of a rank's "
                    "whole tensor-parallel shard (12 bytes per parameter) and all-reduces them "
                    "over data parallelism, on every rank; use parallel.zero=megatron, whose "
                    "saves are fully parallel, each rank writing its own part")
            if p.zero_stage == 3 and cfg.checkpoint.async_save:
                raise ConfigError("checkpoint.async_save does not work with DeepSpeed ZeRO-3: "
                                  "its parameters are gathered only while a save is scheduled, "
                                  "not while the forked writer reads them")
        elif p.zero_stage not in (0, 1):
            raise ConfigError(f"parallel.zero=megatron supports zero_stage 0 (DDP) or 1 "
                              f"(distributed optimizer), got {p.zero_stage}")
        if p.overlap_grad_reduce and p.pp > 1:
            raise ConfigError("parallel.overlap_grad_reduce works with parallel.pp = 1 only: the "
                              "conditioning embedders replicated on every stage must be summed "
                              "over the pipeline before the data-parallel reduction starts")
        if cfg.train.compile and p.zero == "deepspeed" and p.zero_stage >= 2:
            raise ConfigError("train.compile does not work with DeepSpeed ZeRO-2/3: with "
                              "compiled blocks the gradients it reduces during backward differ "
                              "from eager ones (measured at ZeRO-2 DP2: gradient norm 1.3% off "
                              "after 6 steps); use zero_stage 1 or parallel.zero=megatron (see "
                              "megatron_ecdit/parallel/compile.py)")
        return cls(world_size, p.tp, p.sp, p.pp, p.vpp, p.ep, etp, p.zero, p.zero_stage,
                   p.activation_checkpointing, p.overlap_grad_reduce)
