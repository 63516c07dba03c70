"""EC-MoE layer speed and memory against its baselines, in one process. Prints a table.

    python benchmarks/bench_ec_layer.py [--d 512] [--s 256] [--b 8] [--experts 8 32 64]
                                        [--device cuda] [--dtype bf16]

Ratios (forward + backward in --dtype, fp32 by default, median of --iters runs):
  vs dense   time of the EC layer / a dense GELU FFN of hidden f_c * 4d on the same tokens,
             i.e. the same expert FLOPs (goal <= 1.15x)
  vs Alg. 1  time of the literal Algorithm 1 / the EC layer, at S = --s-alg1 (goal >= 10x)
  memory     bytes saved for backward by the EC layer / by the dense FFN (CPU has no peak
             allocator statistic; saved activations are what dominates training memory)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_ecdit.moe.experts import GroupedExperts  # noqa: E402
from megatron_ecdit.moe.layer import MoELayer  # noqa: E402
from megatron_ecdit.moe.reference import algorithm1, expert_functions  # noqa: E402
from megatron_ecdit.moe.router import ExpertChoiceRouter  # noqa: E402


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, iters: int, params: list[torch.Tensor]) -> float:
    """Median seconds of fn(); gradients are reset to None first, as an optimizer step does."""
    times = []
    for i in range(iters + 1):
        for p in params:
            p.grad = None
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        if i == 0:  # warm-up
            continue
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_bytes(fn, params: list[torch.Tensor]) -> int:
    """Bytes of activations autograd keeps for backward (parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


class ECAgainstDense:
    """An EC layer (E experts of hidden 4d, capacity factor fc) and a dense GELU FFN of hidden
    fc * 4d (the same expert FLOPs), on one input of (S, B, d) tokens; on the default device."""

    def __init__(self, d: int, E: int, fc: float, S: int, B: int,
                 dtype: torch.dtype = torch.float32):
        self.layer = MoELayer(ExpertChoiceRouter(d, E, fc), GroupedExperts(E, d, 4 * d)).to(dtype)
        self.w1 = (torch.randn(d, int(fc * 4 * d)) * 0.02).to(dtype).requires_grad_()
        self.w2 = (torch.randn(int(fc * 4 * d), d) * 0.02).to(dtype).requires_grad_()
        self.x = torch.randn(S, B, d, dtype=dtype, requires_grad=True)

    def ec(self) -> torch.Tensor:
        return self.layer(self.x).output.sum()

    def dense(self) -> torch.Tensor:
        return (F.gelu(self.x @ self.w1, approximate="tanh") @ self.w2).sum()

    def params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [self.x, *self.layer.parameters()], [self.x, self.w1, self.w2]

    def seconds(self, iters: int) -> tuple[float, float]:
        """Median forward + backward seconds of the EC layer and of the dense FFN."""
        ec_params, dense_params = self.params()
        return (timed(lambda: self.ec().backward(), iters, ec_params),
                timed(lambda: self.dense().backward(), iters, dense_params))

    def memory_ratio(self) -> float:
        """Bytes saved for backward by the EC layer / by the dense FFN."""
        ec_params, dense_params = self.params()
        return saved_bytes(self.ec, ec_params) / saved_bytes(self.dense, dense_params)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--s", type=int, default=256)
    parser.add_argument("--b", type=int, default=8)
    parser.add_argument("--s-alg1", type=int, default=1024)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--capacity-factor", type=float, default=2.0)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="of the weights and activations (the router computes in fp32)")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    torch.set_default_device(args.device)
    torch.manual_seed(0)
    d, fc = args.d, args.capacity_factor
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"CPU, {args.threads} threads")
    print(f"EC-MoE layer, d={d} S={args.s} B={args.b} f_c={fc}, fwd+bwd {args.dtype}, {where}, "
          f"torch {torch.__version__}")
    print(f"{'E':>4} {'EC ms':>8} {'dense ms':>9} {'vs dense':>9} {f'EC@S{args.s_alg1}':>9} "
          f"{'Alg1 ms':>9} {'vs Alg.1':>9} {'mem vs dense':>13}")
    for E in args.experts:
        pair = ECAgainstDense(d, E, fc, args.s, args.b, dtype)
        layer = pair.layer
        t_ec, t_dense = pair.seconds(args.iters)
        mem = pair.memory_ratio()

        x_long = torch.randn(args.s_alg1, args.b, d, dtype=dtype, requires_grad=True)
        x_long_bsd = x_long.detach().transpose(0, 1).contiguous().requires_grad_()
        experts = expert_functions(layer.experts.w1, layer.experts.w2)
        C = layer.router.capacity(args.s_alg1)
        long_params = [x_long, x_long_bsd, *layer.parameters()]
        t_ec_long = timed(lambda: layer(x_long).output.sum().backward(), args.iters, long_params)
        t_alg1 = timed(lambda: algorithm1(x_long_bsd, layer.router.weight, experts, C)
                       .sum().backward(), max(1, args.iters // 2), long_params)
        print(f"{E:>4} {1e3 * t_ec:>8.1f} {1e3 * t_dense:>9.1f} {t_ec / t_dense:>8.2f}x "
              f"{1e3 * t_ec_long:>9.1f} {1e3 * t_alg1:>9.1f} {t_alg1 / t_ec_long:>8.1f}x "
              f"{mem:>12.2f}x")
    print("goals: vs dense <= 1.15x, vs Alg.1 >= 10x")


if __name__ == "__main__":
    main()
