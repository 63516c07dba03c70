"""GPU check (one CUDA device, about 4-5 minutes on an H100): run it whenever a GPU is at hand.

    python benchmarks/gpu/check_gpu.py [--text-encoder FOLDER] [--skip-training] [--out FILE]

Checks, in this order (XL width: d=1152, 18 heads, 6 KV heads, cond 768, 8 experts with f_c=2
on every other block, 256 image tokens, 32 text tokens):

tiny model     The demo's EC-DiT (bf16 parameters, fused AdamW) through megatron-core on CUDA,
               with the CPU compatibility layer inactive: three steps give finite losses.
XL models      Builds the next three checks' models (benchmarks/bench_train_step.py's Bench):
               4 XL-width blocks at batch 32, in fp32 and in bf16.
XL step        The whole training step (forward, loss, backward, clip + AdamW, EMA): all speed
               levers off (fp32, AdamW's loop, eager), bf16 + fused AdamW (the demo's settings)
               and all on (bf16 + fused + compile). Step time, TFLOP/s, MFU against the dense
               bf16 peak (989 TFLOP/s on H100 and H200) and against a bf16 GEMM timed between
               the steps. Goal: all on >= 35% of the peak.
XL phases      torch.profiler's time per phase of one step of bf16 + fused and of all on.
no host sync   One step of the bf16 model, eager and compiled (forward, loss, backward,
               clip + update, EMA) under torch.cuda.set_sync_debug_mode("error"): nothing
               waits for the device. Left out: the one documented read, the gradient norm that
               `TorchOptimizer.step` returns for the log (`float(update(lr))`).
EC vs dense    Forward + backward of the EC layer against a dense FFN of the same FLOPs at XL
               width, 256 tokens x 32 (benchmarks/bench_ec_layer.py), fp32 and bf16.
               Goal: <= 1.05x.
bf16 vs fp32   4 XL-width blocks at batch 8, the same weights in fp32 and in megatron-style
               bf16 (bf16 parameters, fp32 main weights and gradients; training/step_checks.py
               `bf16_against_fp32`, the CPU test's check): the prediction and each main
               gradient within 2e-2 relative, and >= 99.5% of the expert choices equal when
               each bf16 router is given the input its fp32 twin saw (end to end, the
               differences earlier blocks hand on add up: reported, no tolerance). On a CPU
               (bf16 matmuls, fp32 attention core) the same blocks gave 9.2e-3, 1.1e-2 and
               99.13% of 8192 choices end to end.
training job   `pretrain_ecdit.py` with the demo config (bf16) on CUDA: 40 steps straight
               (a checkpoint at step 20), then a new process resumes from that checkpoint to
               step 40. The losses of steps 21-40 agree within 1e-2 relative (GPU kernels
               with atomics are not bitwise reproducible: a tolerance, not an equality).

Each row is printed as it comes: check, what, value, status. A check whose status is FAILED
(or that raises) makes the exit status 1; a goal is reported as met or not and fails nothing.
`--out FILE` writes the rows as JSON after every check (a run stopped early keeps what it had).
Record results in benchmarks/RESULTS.md.

    python benchmarks/gpu/check_gpu.py --device cpu --tiny [--threads 1]

runs every check on the CPU at the demo's size (bf16 vs fp32: the tests' model), a few steps
each, HostReads instead of the CUDA sync mode and no goals: tests/test_check_gpu.py keeps the
script working without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_ec_layer import ECAgainstDense  # noqa: E402
from benchmarks.bench_train_step import (Bench, Variant, breakdown, random_batch,  # noqa: E402
                                         shape_config, time_steps)
from megatron_ecdit.config import Config  # noqa: E402
from megatron_ecdit.diffusion.rectified_flow import flow_matching_loss  # noqa: E402
from megatron_ecdit.models.ecdit import ECDiT  # noqa: E402
from megatron_ecdit.parallel import cpu_compat  # noqa: E402
from megatron_ecdit.parallel.backends.one_process import TorchOptimizer  # noqa: E402
from megatron_ecdit.parallel.layout import ParallelLayout  # noqa: E402
from megatron_ecdit.parallel.setup import initialize_parallel  # noqa: E402
from megatron_ecdit.training.step_checks import (bf16_against_fp32, device_reads,  # noqa: E402
                                                 tiny_model_config)

# Dense bf16 peak (TFLOP/s) by device name; other GPUs report MFU against H100's.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
MFU_GOAL = 0.35
EC_DENSE_GOAL = 1.05
FAILED = "FAILED"

ALL_OFF = Variant("all off", False, "for_loop")
BF16_FUSED = Variant("bf16 + fused", False, "fused", "bf16")
ALL_ON = Variant("all on", True, "fused", "bf16")
VARIANTS = [ALL_OFF, BF16_FUSED, ALL_ON]


@dataclasses.dataclass
class Row:
    check: str
    item: str
    value: str
    status: str  # "ok", FAILED, a goal met or not, or empty (a measurement)


class Report:
    """The rows of every check, printed as they come and written to `out` after each check."""

    def __init__(self, out: str | None, header: dict):
        self.out, self.header = out, header
        self.rows: list[Row] = []
        self.check = ""

    def add(self, item: str, value: str, status: str = "") -> None:
        row = Row(self.check, item, value, status)
        self.rows.append(row)
        print(f"{row.check:<13} {row.item:<58} {row.value:<32} {row.status}", flush=True)

    def run(self, name: str, check, *args):
        """Run one check; an exception fails it (with its message) and the next ones still
        run. Returns what the check returns, or None."""
        self.check = name
        start = time.perf_counter()
        result = None
        try:
            result = check(self, *args)
        except Exception as err:  # noqa: BLE001 - a broken check is a failed check
            traceback.print_exc()
            self.add("raised", f"{type(err).__name__}: {err}".replace("\n", " ")[:300], FAILED)
        self.add("time", f"{time.perf_counter() - start:.1f} s")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.write()
        return result

    @property
    def failed(self) -> bool:
        return any(row.status == FAILED for row in self.rows)

    def write(self) -> None:
        if self.out:
            Path(self.out).write_text(json.dumps(
                {**self.header, "failed": self.failed,
                 "rows": [dataclasses.asdict(row) for row in self.rows]}, indent=1) + "\n")


def verdict(ok: bool) -> str:
    return "ok" if ok else FAILED


def goal(met: bool, target: str) -> str:
    return f"goal {target}: {'met' if met else 'not met'}"


@dataclasses.dataclass
class Sizes:
    """What the checks run at: XL width on a GPU, the demo's size for the CPU smoke run."""
    tiny: bool
    device: torch.device
    peak_tflops: float | None  # dense bf16; None on a CPU (no goals there)

    def step_config(self) -> Config:
        if not self.tiny:
            return shape_config("xl", 4, 32)
        cfg = shape_config("demo", 0, 0)
        cfg.train.micro_batch_size = 4  # bf16 is emulated, slowly, on a CPU without AVX-512 BF16
        return cfg

    def bf16_config(self) -> Config:
        if not self.tiny:
            return shape_config("xl", 4, 8)
        cfg = Config()
        cfg.model, cfg.moe = tiny_model_config()  # the CPU test's
        cfg.train.micro_batch_size = 64
        return cfg

    @property
    def iters(self) -> int:
        return 2 if self.tiny else 20

    @property
    def gemm(self) -> int:  # the roofline GEMM's side
        return 256 if self.tiny else 8192

    @property
    def ec_layer(self) -> tuple:  # d, E, f_c, S, B
        return (128, 8, 2.0, 64, 16) if self.tiny else (1152, 8, 2.0, 256, 32)

    @property
    def job_steps(self) -> int:  # straight; the resumed run stops half-way first
        return 4 if self.tiny else 40


# --------------------------------------------------------------------------- checks

def check_tiny_model(report: Report, sizes: Sizes, ctx) -> None:
    cuda = sizes.device.type == "cuda"
    report.add("CPU compatibility layer applied", str(cpu_compat._applied),
               verdict(not cpu_compat._applied) if cuda else "")
    cfg = shape_config("demo", 0, 0)
    torch.manual_seed(0)
    model = ECDiT(cfg.model, cfg.moe, ctx).to(sizes.device, torch.bfloat16)
    backend = TorchOptimizer(model, cfg.optim)
    inputs, target = random_batch(cfg, sizes.device)
    losses = []
    for _ in range(3):
        backend.zero_grad()
        loss = flow_matching_loss(model(*inputs).prediction, target)
        backend.backward(loss)
        backend.step(cfg.optim.lr)
        losses.append(loss.item())
    report.add("demo EC-DiT in bf16: losses of 3 steps", " ".join(f"{v:.4f}" for v in losses),
               verdict(all(map(torch.isfinite, torch.tensor(losses)))))


def build_xl_models(report: Report, sizes: Sizes) -> Bench:
    """The models, optimizers, EMAs and batch of the next three checks."""
    cfg = sizes.step_config()
    bench = Bench(cfg, sizes.device, VARIANTS)
    m = cfg.model
    report.add("shape", f"{m.num_layers} blocks d={m.hidden_size} B={cfg.train.micro_batch_size} "
               f"S={m.num_patches}, {bench.flops / 1e12:.2f} TFLOP per step")
    return bench


def needs(bench: Bench | None) -> Bench:
    if bench is None:
        raise RuntimeError("no models: XL models failed")
    return bench


def check_xl_step(report: Report, sizes: Sizes, bench: Bench | None) -> None:
    bench, variants = needs(bench), VARIANTS
    timings = time_steps(bench, variants, sizes.iters, sizes.gemm)
    gemm = timings.roofline["bf16"]
    report.add(f"{sizes.gemm}^3 GEMM timed between the steps",
               f"bf16 {gemm / 1e12:.1f}, fp32 {timings.roofline['fp32'] / 1e12:.1f} TFLOP/s")
    for v in variants:
        seconds = timings.step[v.name]
        achieved = bench.flops / seconds
        report.add(f"{v.name}: step (first step)",
                   f"{1e3 * seconds:.1f} ms ({timings.first[v.name]:.1f} s)")
        report.add(f"{v.name}: achieved, MFU vs the bf16 GEMM",
                   f"{achieved / 1e12:.1f} TFLOP/s, {100 * achieved / gemm:.1f}%")
        if sizes.peak_tflops:
            mfu = achieved / (sizes.peak_tflops * 1e12)
            report.add(f"{v.name}: MFU vs {sizes.peak_tflops:.0f} TFLOP/s dense bf16",
                       f"{100 * mfu:.1f}%",
                       goal(mfu >= MFU_GOAL, f">= {100 * MFU_GOAL:.0f}%") if v is ALL_ON else "")
    report.add("speed-up: all on / all off",
               f"{timings.step[ALL_OFF.name] / timings.step[ALL_ON.name]:.2f}x")
    if sizes.device.type == "cuda":
        report.add("peak memory", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def check_xl_phases(report: Report, bench: Bench | None) -> None:
    bench = needs(bench)
    eager, compiled = breakdown(bench, BF16_FUSED), breakdown(bench, ALL_ON)
    for phase in sorted(set(eager) | set(compiled), key=lambda p: -eager.get(p, 0)):
        report.add(f"{phase} (bf16 + fused / all on)",
                   f"{1e3 * eager.get(phase, 0):.1f} / {1e3 * compiled.get(phase, 0):.1f} ms")
    report.add("total (bf16 + fused / all on)",
               f"{1e3 * sum(eager.values()):.1f} / {1e3 * sum(compiled.values()):.1f} ms")


def check_no_host_sync(report: Report, bench: Bench | None) -> None:
    bench = needs(bench)
    for variant in (BF16_FUSED, ALL_ON):  # steps after the first: the optimizer has its state
        with device_reads(bench.device) as reads:
            bench.run(variant)
        report.add(f"{variant.name}: reads in a step but the log's",
                   "; ".join(f"{op} ({site})" for op, _, site in reads) or "none",
                   verdict(not reads))


def check_ec_vs_dense(report: Report, sizes: Sizes) -> None:
    d, E, fc, S, B = sizes.ec_layer
    report.add("shape", f"d={d} E={E} f_c={fc} S={S} B={B}")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        with torch.device(sizes.device):
            ec, dense = ECAgainstDense(d, E, fc, S, B, dtype).seconds(sizes.iters)
        report.add(f"{name}: EC / dense forward + backward",
                   f"{ec / dense:.2f}x ({1e3 * ec:.2f} / {1e3 * dense:.2f} ms)",
                   goal(ec / dense <= EC_DENSE_GOAL, f"<= {EC_DENSE_GOAL}x")
                   if sizes.peak_tflops else "")


def check_bf16_vs_fp32(report: Report, sizes: Sizes, ctx) -> None:
    cfg = sizes.bf16_config()

    def build() -> ECDiT:
        torch.manual_seed(0)
        return ECDiT(cfg.model, cfg.moe, ctx).to(sizes.device)

    m = cfg.model
    report.add("shape", f"{m.num_layers} blocks d={m.hidden_size} B={cfg.train.micro_batch_size} "
               f"S={m.num_patches}")
    inputs, target = random_batch(cfg, sizes.device)
    result = bf16_against_fp32(build, inputs, target)
    name, error = result.worst_gradient()
    report.add("prediction: relative L2 error", f"{result.prediction:.2e}",
               verdict(result.prediction_ok()))
    report.add("largest main-gradient error", f"{error:.2e} ({name})",
               verdict(result.gradients_ok()))
    report.add("expert choices agreeing, end to end",
               f"{100 * result.agreeing / result.choices:.2f}% of {result.choices}")
    report.add("expert choices agreeing, each router given fp32's input",
               f"{100 * result.layer_agreeing / result.layer_choices:.2f}% of "
               f"{result.layer_choices}", verdict(result.choices_ok()))
    for problem in result.problems:
        report.add("mixed precision", problem, FAILED)


def check_training_job(report: Report, sizes: Sizes, text_encoder: str | None) -> None:
    """The training job straight, and resumed in a new process from the straight run's
    checkpoint half-way."""
    steps, half = sizes.job_steps, sizes.job_steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, *extra: str) -> list[float]:
            args = [sys.executable, str(ROOT / "pretrain_ecdit.py"), "--config",
                    str(ROOT / "examples/configs/demo.yaml"), f"train.steps={steps}",
                    f"train.output_dir={tmp}/{name}",
                    f"data.urls={tmp}/data/{{000000..000003}}.tar",
                    "train.progress=false", f"optim.warmup_steps={half // 2}",
                    "optim.min_lr=2.0e-3", *extra]  # constant after the warm-up
            if sizes.tiny:  # fewer synthetic images, a short sampler at the end
                args += ["data.samples_per_shard=32", "diffusion.sample_steps=2",
                         "train.tensorboard=false"]
            if text_encoder:
                args.append(f"text_encoder.path={text_encoder}")
            start = time.perf_counter()
            env = {k: v for k, v in os.environ.items()  # this process's world is not theirs
                   if k not in ("MASTER_ADDR", "MASTER_PORT")}
            done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stdout[-3000:]}"
                                   f"\n{done.stderr[-3000:]}")
            report.add(f"'{name}' to step {steps}",
                       f"{time.perf_counter() - start:.1f} s (process included)")
            lines = (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()
            return [json.loads(line)["loss"] for line in lines]

        straight = run("straight", f"checkpoint.save_interval={half}")
        resumed = run("resumed", "checkpoint.save_interval=0",
                      f"train.resume={tmp}/straight/checkpoints/step_{half:07d}")
    a, b = torch.tensor(straight[half:]), torch.tensor(resumed)
    rel = ((a - b).abs() / a.abs()).max().item() if len(a) == len(b) else float("nan")
    report.add(f"losses at steps 1/{half}/{steps}",
               " ".join(f"{straight[i]:.4f}" for i in (0, half - 1, steps - 1)),
               verdict(len(straight) == steps and bool(torch.isfinite(a).all())))
    report.add(f"resumed at {half} vs straight, steps {half + 1}-{steps}: max rel. diff",
               f"{rel:.2e}", verdict(rel <= 1e-2))


# --------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true",
                        help="the demo's size and a few steps (the CPU smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    parser.add_argument("--text-encoder", help="text encoder folder (default: the packaged MiniLM)")
    parser.add_argument("--skip-training", action="store_true", help="skip the training job")
    parser.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (or --device cpu --tiny)")
        return 1
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), PEAK_TFLOPS["H100"])
    else:
        torch.set_num_threads(args.threads)
        name, peak = f"CPU, {args.threads} threads", None
    sizes = Sizes(args.tiny, device, peak)
    start = time.perf_counter()
    report = Report(args.out, {"device": name, "torch": torch.__version__,
                               "tiny": args.tiny})
    print(f"{name}, torch {torch.__version__}{', tiny sizes' if args.tiny else ''}", flush=True)
    ctx = initialize_parallel(ParallelLayout.build(Config(), 1))
    report.run("tiny model", check_tiny_model, sizes, ctx)
    bench = report.run("XL models", build_xl_models, sizes)
    report.run("XL step", check_xl_step, sizes, bench)
    report.run("XL phases", check_xl_phases, bench)
    report.run("no host sync", check_no_host_sync, bench)
    del bench
    report.run("EC vs dense", check_ec_vs_dense, sizes)
    report.run("bf16 vs fp32", check_bf16_vs_fp32, sizes, ctx)
    if not args.skip_training:
        report.run("training job", check_training_job, sizes, args.text_encoder)
    report.check = "total"
    report.add("time", f"{time.perf_counter() - start:.1f} s")
    report.write()
    print()
    for row in report.rows:
        if row.status:
            print(f"{row.check:<13} {row.item:<58} {row.value:<32} {row.status}")
    print("FAILED" if report.failed else "all checks passed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
