"""Process groups: torch.distributed + megatron-core parallel_state -> one ParallelContext.

This is the only place that creates or looks up process groups; models receive the result.
Launched by torchrun the world comes from the environment; run as a plain script it is a
one-process gloo world, so megatron-core's layers find their (size-one) groups either way.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig

from megatron_ecdit.config import ConfigError, ParallelConfig
from megatron_ecdit.models.tensor_parallel import ParallelContext


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the torchrun world, or start a one-process world when not under a launcher."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend, rank=0, world_size=1)
    else:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)


def initialize_parallel(parallel: ParallelConfig) -> ParallelContext:
    """Create megatron-core's groups for `parallel` and return the context models are built with."""
    init_distributed()
    world = dist.get_world_size()
    model_parallel = parallel.tp * parallel.pp
    if world % model_parallel:
        raise ConfigError(f"world size {world} is not divisible by parallel.tp x parallel.pp "
                          f"= {model_parallel}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            virtual_pipeline_model_parallel_size=parallel.vpp if parallel.vpp > 1 else None,
            expert_model_parallel_size=parallel.ep,
            expert_tensor_parallel_size=parallel.etp)
    mp_config = ModelParallelConfig(
        tensor_model_parallel_size=parallel.tp,
        sequence_parallel=parallel.sp and parallel.tp > 1,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=torch.float32)
    return ParallelContext(
        mp_config=mp_config,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        ep_group=parallel_state.get_expert_model_parallel_group(),
        expert_tp_group=parallel_state.get_expert_tensor_parallel_group())


def data_parallel_rank_and_size() -> tuple[int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size())
