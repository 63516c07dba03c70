"""Checks of the one-process training step, shared by the CPU tests
(tests/test_speed_levers.py) and the GPU check (benchmarks/gpu/check_gpu.py).

- `bf16_against_fp32`: the same weights and batch in fp32 and in megatron-style bf16 (bf16
  parameters, fp32 main weights and gradients; `TorchOptimizer`): how far the prediction and
  each main weight's gradient are from fp32's, and how many expert choices agree.
- `device_reads`: what the code inside reads back from the device. On CUDA, torch's sync debug
  mode stops at the first synchronizing call; elsewhere `HostReads` and `HostCopies` record
  every read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ecdit.config import ModelConfig, MoEConfig, OptimConfig
from megatron_ecdit.diffusion.rectified_flow import flow_matching_loss
from megatron_ecdit.parallel.backends.one_process import TorchOptimizer

aten = torch.ops.aten

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); through the two blocks of the
# tests' model (width 32), the prediction and the gradients move by well under 1% (measured up
# to 0.6%), and a few expert choices at the boundary of an expert's top-C flip (0.2%).
BF16_RTOL = 2e-2
BF16_CHOICES = 0.995


def tiny_model_config() -> tuple[ModelConfig, MoEConfig]:
    """The CPU tests' model: two blocks (a dense one, an EC-MoE one of 4 experts), width 32,
    16 tokens per image, 16-wide text."""
    return (ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, input_size=8,
                        patch_size=2, text_dim=16), MoEConfig(num_experts=4))


@dataclasses.dataclass
class Bf16Comparison:
    prediction: float  # relative L2 error of the bf16 model's prediction
    gradients: dict[str, float]  # per parameter: its main gradient's error (bf16_against_fp32)
    agreeing: int  # expert choices (an expert, a token) made in both precisions
    choices: int  # expert choices made in fp32
    # The same per router given fp32's input to it (rounded to bf16): the bf16 layer's own
    # effect, without the differences earlier blocks hand on, which grow with depth and width.
    layer_agreeing: int
    layer_choices: int
    problems: list[str]  # broken rules of the mixed precision (dtypes, gradients left behind)

    def worst_gradient(self) -> tuple[str, float]:
        name = max(self.gradients, key=self.gradients.__getitem__)
        return name, self.gradients[name]

    def prediction_ok(self) -> bool:
        return self.prediction <= BF16_RTOL

    def gradients_ok(self) -> bool:
        return self.worst_gradient()[1] <= BF16_RTOL

    def choices_ok(self) -> bool:
        return self.layer_agreeing >= BF16_CHOICES * self.layer_choices

    def failures(self) -> list[str]:
        name, error = self.worst_gradient()
        return self.problems + [message for ok, message in (
            (self.prediction_ok(), f"prediction error {self.prediction:.2e} > {BF16_RTOL:.0e}"),
            (self.gradients_ok(), f"gradient error of {name} {error:.2e} > {BF16_RTOL:.0e}"),
            (self.choices_ok(), f"{self.layer_agreeing} of {self.layer_choices} expert choices "
                                f"agree given the same input (< {100 * BF16_CHOICES:.1f}%)"))
            if not ok]


def routers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if m.__class__.__name__ == "ExpertChoiceRouter"]


def routed_tokens(model: nn.Module) -> tuple[list[tuple], list]:
    """Forward hooks recording, per MoE router call, its inputs and each (expert, slot)'s token
    index; returns the list they fill and their handles."""
    recorded, handles = [], []
    for router in routers(model):
        handles.append(router.register_forward_hook(
            lambda m, args, out: recorded.append((args, out.token_index_EN))))
    return recorded, handles


def agreement(pairs) -> tuple[int, int]:
    """(choices made in both, choices of the reference) over (reference, other) token-index
    tensors (E, N): the tokens each expert chose."""
    agreeing = total = 0
    for ref, mine in pairs:
        agreeing += sum(int(torch.isin(m, r).sum()) for m, r in zip(mine, ref))
        total += ref.numel()
    return agreeing, total


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bf16_against_fp32(build: Callable[[], nn.Module], inputs: tuple,
                      target: torch.Tensor) -> Bf16Comparison:
    """Two models from `build()` (on the device of `inputs`) with the same weights, one in fp32
    and one cast to bf16 with a `TorchOptimizer` (its fp32 main weights collect the gradients);
    one forward and backward of each on the same batch. The tensors initialised to zero (adaLN's
    modulation, the final layer, biases) are first moved away from zero by N(0, 0.05^2) noise,
    as after some training; the others keep their initialisation, which scales with the width
    (noise on every tensor would grow the activations of an XL-width model, and its errors,
    several times over: through two XL-width blocks on a CPU, 3.4e-2 on the prediction and 97%
    of the expert choices).

    Each gradient's error is relative to its own norm, or to 1% of the whole gradient's for
    those that are zero in exact arithmetic (the key bias: softmax ignores a shift) and only
    noise."""
    fp32 = build()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in fp32.parameters():
            if not p.any():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
    bf16 = build()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    backend = TorchOptimizer(bf16, OptimConfig())
    choices, predictions, problems = {}, {}, []
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        choices[name], handles = routed_tokens(model)
        out = model(*inputs)
        for handle in handles:
            handle.remove()
        if out.prediction.dtype != torch.float32:
            problems.append(f"{name} model's prediction is {out.prediction.dtype}")
        flow_matching_loss(out.prediction, target).backward()
        predictions[name] = out.prediction.detach()
    whole = torch.cat([p.grad.reshape(-1) for p in fp32.parameters()]).norm()
    gradients = {}
    for (name, p32), p16 in zip(fp32.named_parameters(), bf16.parameters()):
        main = backend.main[p16]
        if p16.dtype != torch.bfloat16:
            problems.append(f"{name}: the parameter is {p16.dtype}, not bf16")
        if p16.grad is not None:
            problems.append(f"{name}: the bf16 parameter kept its gradient")
        if main.dtype != torch.float32 or main.grad.dtype != torch.float32:
            problems.append(f"{name}: main weight {main.dtype}, its gradient {main.grad.dtype}")
        gradients[name] = float((main.grad - p32.grad).norm()
                                / torch.maximum(p32.grad.norm(), 1e-2 * whole))
    agreeing, choices_made = agreement(
        (ref, mine) for (_, ref), (_, mine) in zip(choices["fp32"], choices["bf16"]))
    with torch.no_grad():  # each bf16 router on the input its fp32 twin saw
        same_input = [(ref, router(*(None if a is None else a.bfloat16() for a in args))
                       .token_index_EN)
                      for router, (args, ref) in zip(routers(bf16), choices["fp32"])]
    return Bf16Comparison(relative_error(predictions["bf16"], predictions["fp32"]), gradients,
                          agreeing, choices_made, *agreement(same_input), problems)


# ------------------------------------------------------------------ reads from the device

class HostReads(TorchDispatchMode):
    """Records every op that makes the host wait for the device: a scalar read (`item`,
    `float`, `int`, `bool` of a tensor all reach aten._local_scalar_dense) or an op whose output
    shape depends on the data (nonzero, masked_select, unique; boolean-mask indexing runs
    nonzero). Python-level copies to the host (`tolist`, `cpu`, `numpy`) are caught by
    `HostCopies`. Each read keeps the op, the tensor read and the innermost project frame."""

    SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2,
               aten.unique_consecutive, aten.unique_dim}

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, torch.Tensor | None, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SYNCING:
            self.reads.append((str(func), args[0], where(traceback.extract_stack())))
        return func(*args, **(kwargs or {}))


class HostCopies(TorchFunctionMode):
    def __init__(self, reads: list):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy):
            self.reads.append((func.__name__, args[0], where(traceback.extract_stack())))
        return func(*args, **(kwargs or {}))


def where(frames: traceback.StackSummary) -> str:
    """`file:function` of the innermost frame of the project's code (not its tests, not this
    module)."""
    ours = [f for f in frames if "megatron_ecdit" in f.filename and "test_" not in f.filename
            and f.filename != __file__]
    return f"{Path(ours[-1].filename).name}:{ours[-1].name}" if ours else "torch"


SYNC_ERROR = "called a synchronizing CUDA operation"


@contextlib.contextmanager
def device_reads(device: torch.device) -> Iterator[list[tuple[str, torch.Tensor | None, str]]]:
    """Records what the code inside reads back from the device as (op, tensor, where) triples.

    On CUDA, under `torch.cuda.set_sync_debug_mode("error")`: the first call that synchronizes
    with the host (a scalar read, a copy to the host or from pageable host memory, a
    data-dependent shape) raises; the read is recorded as (the innermost frame, None, where) and
    the rest of the code inside does not run. Elsewhere, `HostReads` and `HostCopies` record
    every read and the code runs to its end."""
    if device.type != "cuda":
        with HostReads() as mode, HostCopies(mode.reads):
            yield mode.reads
        return
    reads: list = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield reads
    except RuntimeError as err:
        if SYNC_ERROR not in str(err):
            raise
        frames = traceback.extract_tb(err.__traceback__)
        last = frames[-1]
        reads.append((f"{Path(last.filename).name}:{last.lineno} {last.line}", None,
                      where(frames)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
