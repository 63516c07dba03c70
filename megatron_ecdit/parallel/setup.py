"""Process groups: torch.distributed + megatron-core parallel_state -> one ParallelContext.

This is the only place that creates or looks up process groups; models receive the result.
Launched by torchrun or srun (one task per GPU) the world comes from the launcher's variables
(parallel/launch.py); run as a plain script it is a one-process gloo world, so megatron-core's
layers find their (size-one) groups either way. On a machine without CUDA the CPU
compatibility layer is applied first.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig

from megatron_ecdit.layers.tensor_parallel import ParallelContext
from megatron_ecdit.parallel import cpu_compat
from megatron_ecdit.parallel.launch import discover
from megatron_ecdit.parallel.layout import ParallelLayout


_groups_for: tuple[int, ...] | None = None  # the degrees parallel_state was initialised with
_timeout: datetime.timedelta | None = None  # of every process group, set when the world starts
CPUINFO = Path("/proc/cpuinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the world of torchrun or srun, or start a one-process world when not under a
    launcher; collectives fail after `timeout_s` without their peers (torch's default where
    None). Raises LaunchError (a ConfigError) when the launcher's variables disagree with
    each other or with the GPUs this node shows."""
    cpu_compat.apply()
    if dist.is_initialized():
        return
    global _timeout
    _timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    # On GPUs, CUDA tensors go over NCCL and the few small CPU tensors (stop flags, counts,
    # checkpoint metadata) over gloo, from one process group.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    launch = discover(os.environ)
    if launch.launcher == "single":  # a private store on a free port (an inherited one may be taken)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
        dist.init_process_group(backend, rank=0, world_size=1, timeout=_timeout)
        return
    launch.export(os.environ)  # torch.distributed's env:// reads torchrun's names
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.device_index(torch.cuda.device_count()))
    dist.init_process_group(backend, timeout=_timeout)


def local_device() -> torch.device:
    """This rank's GPU (set from LOCAL_RANK when the world starts), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively here: a GPU that supports bf16, or a CPU with
    AVX-512 BF16 or AMX (Linux's CPU flags). Elsewhere torch emulates them, on an AVX2 CPU
    ~100x slower than fp32 (benchmarks/RESULTS.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = set(CPUINFO.read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision`, with "auto" made bf16 where native_bf16(device), else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def world_size(timeout_s: float | None = None) -> int:
    init_distributed(timeout_s)
    return dist.get_world_size()


def initialize_parallel(layout: ParallelLayout) -> ParallelContext:
    """Create megatron-core's groups for `layout` (replacing any previous ones) and return the
    context models are built with."""
    global _groups_for
    init_distributed()
    degrees = (layout.tp, layout.pp, layout.vpp, layout.ep, layout.etp)
    if _groups_for != degrees:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.etp,
            **({} if _timeout is None else
               {"distributed_timeout_minutes": _timeout.total_seconds() / 60}))
        _groups_for = degrees
    return parallel_context(layout)


def parallel_context(layout: ParallelLayout) -> ParallelContext:
    """The context models are built with, from megatron-core's groups (already created)."""
    mp_config = ModelParallelConfig(
        tensor_model_parallel_size=layout.tp,
        sequence_parallel=layout.sp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        # Weights are drawn on the CPU from the seed and sliced: the same initial weights on
        # every device and layout; models are moved to their device afterwards.
        use_cpu_initialization=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32)
    return ParallelContext(
        mp_config=mp_config,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        ep_group=parallel_state.get_expert_model_parallel_group(),
        expert_tp_group=parallel_state.get_expert_tensor_parallel_group(),
        recompute=layout.recompute)


def data_parallel_rank_and_size() -> tuple[int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size())
