"""GPU check (one CUDA device, a few minutes): run it whenever a GPU is at hand.

    python benchmarks/gpu/check_gpu.py

1. The tiny EC-DiT through megatron-core on CUDA, with the CPU compatibility layer inactive:
   forward, backward and an optimizer step give finite numbers.
2. The EC layer in bf16 autocast against fp32 (d=1152, E=8, S=256, B=8): output error and
   how many expert choices agree.
3. One training step (forward, backward, AdamW) of XL-width EC-DiT blocks (d=1152, 18 heads,
   6 KV heads, 8 experts on every other block, 256 tokens, bf16 autocast), timed, with its
   model FLOPs utilisation against the device's dense bf16 peak.
4. The training job (`pretrain_ecdit.py`, the demo config) on CUDA: 40 steps straight, and 20
   steps, a checkpoint, then a resume to step 40; prints both runs' losses of steps 21-40 and
   their largest relative difference (GPU kernels with atomics are not bitwise reproducible,
   so this is a tolerance, not an equality).

    python benchmarks/gpu/check_gpu.py [--text-encoder FOLDER] [--skip-training]

Prints a table; exits non-zero if a check fails. Record results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megatron_ecdit.config import Config, ModelConfig, MoEConfig  # noqa: E402
from megatron_ecdit.models.ecdit import ECDiT  # noqa: E402
from megatron_ecdit.moe.experts import GroupedExperts  # noqa: E402
from megatron_ecdit.moe.layer import MoELayer  # noqa: E402
from megatron_ecdit.moe.router import ExpertChoiceRouter  # noqa: E402
from megatron_ecdit.parallel import cpu_compat  # noqa: E402
from megatron_ecdit.parallel.layout import ParallelLayout  # noqa: E402
from megatron_ecdit.parallel.setup import initialize_parallel  # noqa: E402
from megatron_ecdit.planning.activations import Shape  # noqa: E402
from megatron_ecdit.planning.estimate import forward_flops  # noqa: E402

# Dense bf16 peak (TFLOP/s) by device name; others report MFU against H100's.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def step_of(model, batch, optimizer):
    x, t, text, mask, target = batch
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, text, mask)
    loss = (out.prediction.float() - target).square().mean()
    loss.backward()
    optimizer.step()
    return loss


def random_batch(model_cfg: ModelConfig, B: int, L: int = 32):
    m = model_cfg
    x = torch.randn(B, m.in_channels, m.input_size, m.input_size, device="cuda")
    return (x, torch.rand(B, device="cuda"), torch.randn(B, L, m.text_dim, device="cuda"),
            torch.ones(B, L, dtype=torch.bool, device="cuda"), torch.randn_like(x))


def training_job(text_encoder: str | None) -> tuple[list[tuple[str, str]], list[str]]:
    """Section 4: the training job on CUDA, straight and resumed (separate processes)."""
    root = Path(__file__).resolve().parents[2]
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, steps: int, *extra: str) -> list[float]:
            args = [sys.executable, str(root / "pretrain_ecdit.py"), "--config",
                    str(root / "examples/configs/demo.yaml"), f"train.steps={steps}",
                    f"train.output_dir={tmp}/{name}", f"data.urls={tmp}/data/{{000000..000003}}.tar",
                    "train.progress=false", "optim.warmup_steps=10",
                    "optim.min_lr=2.0e-3", *extra]  # constant after warm-up: the same
            # schedule for a 20-step and a 40-step run
            if text_encoder:
                args.append(f"text_encoder.path={text_encoder}")
            start = time.perf_counter()
            env = {k: v for k, v in os.environ.items()  # this process's world is not theirs
                   if k not in ("MASTER_ADDR", "MASTER_PORT")}
            done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stdout[-3000:]}"
                                   f"\n{done.stderr[-3000:]}")
            rows.append((f"training job '{name}' to step {steps}",
                         f"{time.perf_counter() - start:.1f} s (process included)"))
            lines = (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()
            return [json.loads(line)["loss"] for line in lines]

        try:
            straight = run("straight", 40, "checkpoint.save_interval=0")
            run("resumed", 20, "checkpoint.save_interval=20")
            resumed = run("resumed", 40, "checkpoint.save_interval=0", "train.resume=auto")
        except RuntimeError as err:
            return rows, [f"training job failed: {err}"]
        a, b = torch.tensor(straight[20:40]), torch.tensor(resumed[20:40])
        rel = ((a - b).abs() / a.abs()).max().item()
        rows += [("training job: losses, steps 1/20/40", " ".join(
                     f"{straight[i]:.4f}" for i in (0, 19, 39))),
                 ("training job: resumed vs straight, steps 21-40, max rel. diff", f"{rel:.2e}")]
        if not all(torch.isfinite(a)) or rel > 1e-2:
            failures.append(f"resumed losses differ from the straight run by {rel:.2e}")
    return rows, failures


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text-encoder", help="text encoder folder (default: the packaged MiniLM)")
    parser.add_argument("--skip-training", action="store_true", help="skip section 4")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU")
        return 1
    name = torch.cuda.get_device_name()
    ctx = initialize_parallel(ParallelLayout.build(Config(), 1))
    failures = []
    rows = [("device", name), ("CPU layer applied", str(cpu_compat._applied))]
    if cpu_compat._applied:
        failures.append("the CPU compatibility layer was applied on a GPU")

    # 1. Tiny model end to end on CUDA.
    torch.manual_seed(0)
    cfg = Config()
    model = ECDiT(cfg.model, cfg.moe, ctx).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = [step_of(model, random_batch(cfg.model, 16), opt).item() for _ in range(3)]
    rows.append(("tiny EC-DiT losses (3 steps)", " ".join(f"{v:.4f}" for v in losses)))
    if not all(torch.isfinite(torch.tensor(losses))):
        failures.append("tiny model loss is not finite")

    # 2. bf16 EC layer against fp32.
    d, E, S, B = 1152, 8, 256, 8
    layer = MoELayer(ExpertChoiceRouter(d, E, 2.0), GroupedExperts(E, d, 4 * d)).cuda()
    x = torch.randn(S, B, d, device="cuda")
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = layer(x)
    rel = ((low.output.float() - ref.output).norm() / ref.output.norm()).item()
    ref_idx = layer.router(x).token_index_EN
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low_idx = layer.router(x.bfloat16()).token_index_EN
    agree = torch.stack([torch.isin(low_idx[e], ref_idx[e]).float().mean()
                         for e in range(E)]).mean().item()
    rows += [("EC layer bf16 vs fp32: relative L2 error", f"{rel:.2e}"),
             ("EC layer bf16 vs fp32: expert choices agreeing", f"{100 * agree:.2f}%")]
    if rel > 2e-2:
        failures.append(f"bf16 EC layer error {rel:.2e} > 2e-2")

    # 3. XL-width EC blocks: one timed training step.
    xl = ModelConfig(hidden_size=1152, num_layers=4, num_heads=18, num_kv_heads=6, cond_dim=768,
                     in_channels=8, input_size=32, patch_size=2, text_dim=1280)
    moe = MoEConfig(num_experts=8, capacity_factor=2.0)
    model = ECDiT(xl, moe, ctx).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    B = 32
    batch = random_batch(xl, B)
    for _ in range(3):  # warm-up
        step_of(model, batch, opt)
    torch.cuda.synchronize()
    iters = 10
    start = time.perf_counter()
    for _ in range(iters):
        step_of(model, batch, opt)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    flops = 3 * sum(forward_flops(Config(model=xl, moe=moe), Shape(B, xl.num_patches, 32)))
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), PEAK_TFLOPS["H100"])
    rows += [("XL-width blocks: step time (4 blocks, B=32, S=256)", f"{1e3 * seconds:.1f} ms"),
             ("XL-width blocks: achieved", f"{flops / seconds / 1e12:.1f} TFLOP/s"),
             (f"XL-width blocks: MFU vs {peak:.0f} TFLOP/s", f"{100 * flops / seconds / 1e12 / peak:.1f}%"),
             ("peak memory", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")]
    del model, opt, batch
    torch.cuda.empty_cache()

    if not args.skip_training:
        more_rows, more_failures = training_job(args.text_encoder)
        rows += more_rows
        failures += more_failures

    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
