"""The whole training step (forward, backward, optimizer, EMA), each speed lever on against off.

    python benchmarks/bench_train_step.py [--shapes demo xl] [--device cuda] [--iters 8]
                                          [--peak-tflops 67 989] [--xl-blocks 2] [--xl-batch 2]

Shapes: `demo` is the embedded default (examples/configs/demo.yaml: 6 blocks, d=128, 64 image
tokens, 16 images); `xl` is XL-width blocks (d=1152, 18 heads, cond 768, 8 experts with f_c=2
on every other block, 256 image tokens, 32 text tokens), as many blocks and images as
--xl-blocks and --xl-batch say. Inputs are random tensors of the shapes the job feeds (data
loading and the frozen encoders are not timed: bench_loader.py covers the data).

Levers (the job's switches), each alone and all together, against all off, timed round-robin
in one process (the median of --iters steps each, so a busy machine slows every variant alike):
  compile         train.compile: torch.compile per block (parallel/compile.py)
  optimizer       optim.implementation: fused AdamW (or --optimizer foreach) vs torch's loop
  bf16            train.precision: bf16 parameters and activations, fp32 main weights,
                  gradients and Adam state (megatron-style; its own copy of the model)
FLOPs are the planner's (planning/estimate.py `forward_flops`, times 3 for training). MFU is
reported against a large GEMM of the variant's dtype timed between the steps (the honest
roofline of a CPU) and, with --peak-tflops, against a datasheet peak. The phase breakdown is
torch.profiler's time per phase of the all-off and all-on steps; backward kernels are charged
to the phase of the forward op that created them (autograd sequence numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import profile, record_function  # noqa: E402

from megatron_ecdit.checkpoint.consolidated import DTYPES  # noqa: E402
from megatron_ecdit.config import Config, paper_model  # noqa: E402
from megatron_ecdit.diffusion.rectified_flow import flow_matching_loss  # noqa: E402
from megatron_ecdit.models.attention import Attention  # noqa: E402
from megatron_ecdit.models.ecdit import AdaLNModulation, ECDiT, ECDiTBlock  # noqa: E402
from megatron_ecdit.moe.layer import DenseFFN  # noqa: E402
from megatron_ecdit.parallel.backends.one_process import TorchOptimizer  # noqa: E402
from megatron_ecdit.parallel.compile import apply_compile, eager_blocks  # noqa: E402
from megatron_ecdit.parallel.layout import ParallelLayout  # noqa: E402
from megatron_ecdit.parallel.setup import initialize_parallel  # noqa: E402
from megatron_ecdit.planning.activations import Shape  # noqa: E402
from megatron_ecdit.planning.estimate import forward_flops  # noqa: E402
from megatron_ecdit.training.optim import EMA  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def shape_config(name: str, blocks: int, batch: int) -> Config:
    cfg = Config()  # the embedded default is the demo
    if name == "xl":
        cfg.model, cfg.moe = paper_model("XL", 8)
        cfg.model.num_layers = blocks
        cfg.train.micro_batch_size = batch
    else:
        cfg.model.input_size = cfg.data.image_size  # pixel space, as the job derives it
    return cfg


@dataclasses.dataclass
class Variant:
    name: str
    compile: bool
    implementation: str  # the optimizer's
    precision: str = "fp32"


def random_batch(cfg: Config, device: torch.device) -> tuple[tuple, torch.Tensor]:
    """Model inputs (x_t, t, text, mask) and the velocity target of a random batch of the
    shapes the job feeds (cfg.train.micro_batch_size images; text masks of 4 to L tokens)."""
    m, B, L = cfg.model, cfg.train.micro_batch_size, cfg.text_encoder.max_length
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, m.in_channels, m.input_size, m.input_size, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.rand(B, generator=g)
    inputs = tuple(v.to(device) for v in (
        (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise, t,
        torch.randn(B, L, m.text_dim, generator=g),
        torch.arange(L)[None] < torch.randint(4, L + 1, (B, 1), generator=g)))
    return inputs, (noise - x0).to(device)


class Bench:
    """The model in each precision and for each optimizer implementation (the same initial
    weights), with its EMA and optimizer, and the inputs."""

    def __init__(self, cfg: Config, device: torch.device, variants: list[Variant]):
        self.cfg, self.device = cfg, device
        m, B, L = cfg.model, cfg.train.micro_batch_size, cfg.text_encoder.max_length
        # megatron-core's one-process groups, as the job runs (its linear layers, not torch's).
        ctx = initialize_parallel(ParallelLayout.build(cfg, world_size=1))
        # A model per precision and optimizer implementation: an optimizer of bf16 parameters
        # owns their gradients (it moves them into its fp32 main weights).
        self.models, self.emas, self.optimizers = {}, {}, {}
        for key in sorted({(v.precision, v.implementation) for v in variants}):
            torch.manual_seed(0)
            model = ECDiT(m, cfg.moe, ctx).to(device, DTYPES[key[0]])
            self.models[key] = model
            self.emas[key] = EMA(model, cfg.optim.ema_decay)
            self.optimizers[key] = TorchOptimizer(
                model, dataclasses.replace(cfg.optim, lr=1e-6, implementation=key[1]))
            apply_compile(model)  # off: run under eager_blocks()
        self.inputs, self.target = random_batch(cfg, device)
        self.tokens = B * m.num_patches
        dense, expert = forward_flops(cfg, Shape(B, m.num_patches, L))
        self.flops = 3 * (dense + expert)

    def step(self, variant: Variant) -> float:
        """Seconds of one training step, its read of the gradient norm included."""
        synchronize(self.device)
        start = time.perf_counter()
        float(self.run(variant))  # as TorchOptimizer.step returns it for the log
        synchronize(self.device)
        return time.perf_counter() - start

    def run(self, variant: Variant) -> torch.Tensor:
        """A training step less its one read: zero_grad, forward, loss, backward, clip +
        update, EMA; returns the gradient norm (on the device)."""
        key = variant.precision, variant.implementation
        model, opt = self.models[key], self.optimizers[key]
        with nullcontext() if variant.compile else eager_blocks():
            opt.zero_grad()
            out = model(*self.inputs)
            opt.backward(flow_matching_loss(out.prediction, self.target))
        with record_function("optimizer"):
            norm = opt.clip(1e-6)  # TorchOptimizer.step less its read of the norm
            opt.update()
        with record_function("ema"):
            self.emas[key].update(model)
        return norm


def roofline_gemm(device: torch.device, dtype: torch.dtype, n: int):
    """A function timing one n x n x n matmul (2 n^3 FLOPs), run between the steps so that the
    roofline sees the same machine load as they do."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def seconds() -> float:
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        return time.perf_counter() - start

    seconds()
    return seconds


@dataclasses.dataclass
class Timings:
    """Seconds of each variant's first step (it compiles) and the median of its timed steps;
    the roofline GEMM's FLOP/s per precision (median)."""
    first: dict[str, float]
    step: dict[str, float]
    roofline: dict[str, float]


def time_steps(bench: Bench, variants: list[Variant], iters: int, gemm: int) -> Timings:
    """Each variant's first step, then `iters` rounds of a step of every variant and a
    gemm x gemm x gemm matmul of each precision (round-robin: a busy machine slows all alike)."""
    gemms = {p: roofline_gemm(bench.device, DTYPES[p], gemm) for p in ("fp32", "bf16")}
    first = {v.name: bench.step(v) for v in variants}  # compiles (forward and backward)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    gemm_times: dict[str, list[float]] = {p: [] for p in gemms}
    for _ in range(iters):
        for v in variants:
            times[v.name].append(bench.step(v))
        for p, seconds in gemms.items():
            gemm_times[p].append(seconds())
    return Timings(first, {name: statistics.median(t) for name, t in times.items()},
                   {p: 2 * gemm ** 3 / statistics.median(t) for p, t in gemm_times.items()})


# --------------------------------------------------------------------------- phase breakdown

PHASE_OF_LABEL = {"moe.route": "EC route", "moe.dispatch": "dispatch",
                  "moe.experts": "experts", "moe.combine": "combine",
                  "optimizer": "optimizer", "ema": "EMA", "attention": "attention",
                  "adaln_norms": "adaLN + norms", "dense_ffn": "dense FFN",
                  "block": "other in blocks"}
PHASES = ["attention", "EC route", "dispatch", "experts", "combine", "dense FFN",
          "adaLN + norms", "compiled blocks", "other in blocks", "embedders, final, loss",
          "optimizer", "EMA"]


def label_modules(model: nn.Module) -> list:
    """Forward hooks that open a profiler range around each block, its attention, adaLN and
    norm modules and dense FFN (the MoE layer names its own phases); what is left in a block
    is its elementwise work: modulate, gate, residual."""
    kinds = {Attention: "attention", AdaLNModulation: "adaln_norms", nn.LayerNorm: "adaln_norms",
             DenseFFN: "dense_ffn", ECDiTBlock: "block"}
    handles = []
    for module in model.modules():
        label = next((v for k, v in kinds.items() if isinstance(module, k)), None)
        if label is None:
            continue
        ranges = []

        def enter(mod, args, label=label, ranges=ranges):
            ranges.append(record_function(label).__enter__())

        def leave(mod, args, out, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def phase_times(events, device: torch.device) -> dict[str, float]:
    """Seconds per phase: each op's self time goes to the innermost labelled range around it;
    a backward op to the phase of the forward op with its autograd sequence number."""
    def own(e):
        return (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total)

    def phase_of(e, seq_phase):
        while e is not None:
            if e.name in PHASE_OF_LABEL:
                return PHASE_OF_LABEL[e.name]
            if "Compiled" in e.name and "Backward" not in e.name:
                return "compiled blocks"
            if e.name.startswith("autograd::engine::evaluate_function"):
                return seq_phase.get(e.sequence_nr)
            e = e.cpu_parent
        return None

    seq_phase: dict[int, str] = {}
    for e in events:  # forward ops first: they define the phases of their backward
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            seq_phase.setdefault(e.sequence_nr, phase_of(e, {}) or "embedders, final, loss")
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        totals[phase_of(e, seq_phase) or "embedders, final, loss"] += own(e) / 1e6
    return totals


def breakdown(bench: Bench, variant: Variant) -> dict[str, float]:
    """Phase times of one profiled step (compiled blocks are not labelled inside)."""
    handles = [] if variant.compile else label_modules(bench.models[variant.precision, variant.implementation])
    try:
        with profile() as prof:
            bench.step(variant)
    finally:
        for handle in handles:
            handle.remove()
    return phase_times(prof.events(), bench.device)


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["demo", "xl"], choices=["demo", "xl"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--xl-blocks", type=int, default=2)
    parser.add_argument("--xl-batch", type=int, default=2)
    parser.add_argument("--optimizer", default="fused", choices=["fused", "foreach"],
                        help="the optimizer lever's implementation (off: for_loop)")
    parser.add_argument("--peak-tflops", type=float, nargs=2, default=None,
                        metavar=("FP32", "BF16"),
                        help="datasheet dense peaks of the device, for a second MFU")
    parser.add_argument("--gemm", type=int, default=2048, help="side of the roofline GEMM")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"CPU, {args.threads} threads")
    print(f"training step, {where}, torch {torch.__version__}")
    fast = args.optimizer
    variants = [Variant("all off", False, "for_loop"),
                Variant("compile", True, "for_loop"),
                Variant(f"optimizer {fast}", False, fast),
                Variant("bf16", False, "for_loop", "bf16"),
                Variant(f"bf16 + {fast}", False, fast, "bf16"),  # the demo's settings
                Variant("all on", True, fast, "bf16")]
    for name in args.shapes:
        cfg = shape_config(name, args.xl_blocks, args.xl_batch)
        bench = Bench(cfg, device, variants)
        m = cfg.model
        print(f"\n{name}: {m.num_layers} blocks, d={m.hidden_size}, {m.num_heads} heads, "
              f"{cfg.moe.num_experts} experts on blocks "
              f"{cfg.moe.moe_layer_indices(m.num_layers)}, {cfg.train.micro_batch_size} x "
              f"{m.num_patches} image tokens, {bench.flops / 1e9:.1f} GFLOP per step")
        timings = time_steps(bench, variants, args.iters, args.gemm)
        base, roofline, first = timings.step["all off"], timings.roofline, timings.first
        print("roofline: " + ", ".join(f"{p} {args.gemm}^3 GEMM at {r / 1e9:.1f} GFLOP/s"
                                       for p, r in roofline.items())
              + " (medians, timed between the steps)")
        print(f"first compiled step {first['compile']:.1f} s (eager first step "
              f"{first['all off']:.2f} s): compile time ~{first['compile'] - base:.1f} s")
        peak = f"{'MFU peak':>9} " if args.peak_tflops else ""
        print(f"{'variant':<18} {'step ms':>9} {'tokens/s':>10} {'GFLOP/s':>9} "
              f"{'MFU GEMM':>9} {peak}{'speed-up':>9}")
        for v in variants:
            t = timings.step[v.name]
            achieved = bench.flops / t
            peak_tflops = args.peak_tflops[v.precision == "bf16"] if args.peak_tflops else 0
            peak_col = (f"{100 * achieved / (peak_tflops * 1e12):>8.1f}% "
                        if args.peak_tflops else "")
            print(f"{v.name:<18} {1e3 * t:>9.1f} {bench.tokens / t:>10.0f} "
                  f"{achieved / 1e9:>9.1f} {100 * achieved / roofline[v.precision]:>8.1f}% "
                  f"{peak_col}{base / t:>8.2f}x")
        off, on = breakdown(bench, variants[0]), breakdown(bench, variants[-1])
        print(f"{'phase (profiled step)':<24} {'all off ms':>10} {'all on ms':>10}")
        for phase in PHASES:
            if off.get(phase) or on.get(phase):
                print(f"{phase:<24} {1e3 * off.get(phase, 0):>10.1f} "
                      f"{1e3 * on.get(phase, 0):>10.1f}")
        print(f"{'total':<24} {1e3 * sum(off.values()):>10.1f} {1e3 * sum(on.values()):>10.1f}")


if __name__ == "__main__":
    main()
