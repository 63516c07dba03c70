"""CPU compatibility for megatron-core 0.16's hard-coded CUDA calls. Never applied on a GPU.

megatron-core assumes CUDA in a handful of places that carry no math: device arguments
(`device="cuda"`, `torch.cuda.current_device()`), stream and synchronisation calls, and
`Tensor.type()` name checks ('torch.cuda.FloatTensor'). `apply()` redirects exactly those, and
only inside megatron-core's own modules:

- each patched module sees a `torch` whose tensor factories map a CUDA device to the CPU and
  whose `torch.cuda` answers current_device() with the CPU, makes synchronize() and
  empty_cache() no-ops and streams null contexts;
- `Tensor.type()` called from megatron-core without arguments reports CPU tensors under their
  CUDA names, so its dtype checks pass unchanged;
- `Tensor.cuda()` and dist_checkpointing's `ShardedTensor.init_data("cuda")` stay on the CPU.

No collective, layer or optimizer is replaced: the math is megatron-core's. `apply()` does
nothing when CUDA is available, and is idempotent.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from typing import Any

import torch

# The megatron-core modules that hard-code CUDA devices (measured on megatron-core 0.16.1).
PATCHED_MODULES = (
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like",
              "ones_like", "full_like", "rand", "randn")
_applied = False


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    text = str(device) if not isinstance(device, int) else "cuda"
    return "cpu" if text.startswith("cuda") else device


class _CudaOnCpu(types.SimpleNamespace):
    """What megatron-core may ask of torch.cuda, answered for the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _make_cuda_namespace() -> _CudaOnCpu:
    class _NullStream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, *args, **kwargs):
            pass

        def synchronize(self):
            pass

    return _CudaOnCpu(
        current_device=lambda: torch.device("cpu"),
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        Stream=_NullStream,
        stream=lambda *a, **k: contextlib.nullcontext(),
        default_stream=lambda *a, **k: _NullStream(),
        current_stream=lambda *a, **k: _NullStream(),
        is_available=lambda: False,
        device_count=lambda: 0,
    )


def _make_torch_proxy() -> types.ModuleType:
    proxy = types.ModuleType("torch_on_cpu")
    proxy.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})

    def factory(fn):
        def call(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return fn(*args, **kwargs)
        return call

    for name in _FACTORIES:
        setattr(proxy, name, factory(getattr(torch, name)))
    proxy.cuda = _make_cuda_namespace()
    return proxy


def _patch_tensor_type() -> None:
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron.core") and name.startswith("torch.") \
                    and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


def apply() -> bool:
    """Redirect megatron-core's CUDA-only calls to the CPU. Returns True if it did anything."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    proxy = _make_torch_proxy()
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
    _patch_tensor_type()
    # Tensor.cuda() (used to move small send buffers) stays on the CPU.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # The fully parallel load's exchange buffers: ShardedTensor.init_data("cuda").
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    init_data = ShardedTensor.init_data
    ShardedTensor.init_data = lambda self, device, init_fn=torch.empty: init_data(
        self, _cpu_device(device), init_fn)
    _applied = True
    return True
