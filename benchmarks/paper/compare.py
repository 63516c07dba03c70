"""The paper's comparisons in miniature, on the synthetic shapes of the demo (one CPU process).

    python benchmarks/paper/compare.py [--steps 500] [--out runs/paper] [--per-task 8]

Every variant trains the demo's model and data (same shards, same order, same steps, seed 0)
with a different FFN at the MoE blocks (1, 3, 5):
  - same activated compute as EC E=8, f_c=2 (two expert FFNs of width 4d per token):
      dense (E=2, f_c=2: C = T, every token through both expert FFNs, a dense FFN of width 8d
      whose halves are gated per token), token choice top-2 with E=8 and the auxiliary loss,
      EC E=8 f_c=2 (the demo), EC E=16 f_c=2;
  - same total parameters as EC E=8: dense (E=8, f_c=8: every token through all eight).
EC E=8 f_c=2 is trained at three seeds to measure the seed-to-seed spread.

Metrics, with the EMA weights: the flow-matching loss on 64 held-out scenes at 9 fixed
timesteps with fixed noise; the GenEval-style score (ecdit-sample + ecdit-evaluate) on the
held-out prompts, one image each; training throughput. On the trained EC model: the inference
capacity sweep (f_c in 1..4 against score and forward FLOPs, counted by torch's FlopCounterMode),
the experts per token on object pixels against background (per MoE block and timestep), and
the sampling time against the dense model of equal activated compute. Prints markdown tables
and writes plots next to this file.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_ecdit.config import load_config  # noqa: E402
from megatron_ecdit.data.synthetic import render_scene  # noqa: E402
from megatron_ecdit.diffusion.rectified_flow import add_noise, flow_matching_loss  # noqa: E402
from megatron_ecdit.evaluation.geneval import (color_map, evaluate_folder,  # noqa: E402
                                               evaluation_prompts)
from megatron_ecdit.tools import sample_ecdit  # noqa: E402
from megatron_ecdit.training.trainer import train  # noqa: E402

VARIANTS = {  # name: overrides of the demo config
    "dense, equal activated (E2 f_c2)": ["moe.num_experts=2"],
    "token choice top-2 (E8)": ["moe.router=token_choice", "moe.top_k=2",
                                "moe.capacity_factor=1.0"],
    "EC E8 f_c2": [],
    "EC E16 f_c2": ["moe.num_experts=16"],
    "dense, equal total (E8 f_c8)": ["moe.capacity_factor=8"],
}
EC = "EC E8 f_c2"
DENSE = "dense, equal activated (E2 f_c2)"
SEEDS = (0, 1, 2)  # for EC E8 f_c2
SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0)
TIMESTEPS = [0.1 * i for i in range(1, 10)]


def run_name(variant: str, seed: int) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in variant).strip("-")
    return f"{slug}-seed{seed}"


def heldout_loss(job, scenes: int = 64) -> float:
    """Flow-matching loss of the loaded weights on fixed held-out scenes, timesteps and noise."""
    size = job.cfg.data.image_size
    images, captions = [], []
    for i in range(scenes):
        image, caption, _ = render_scene(random.Random(10**9 + i), size)
        images.append(np.asarray(image, dtype=np.float32) / 127.5 - 1)
        captions.append(caption)
    x0 = job.vae.encode(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    text, mask = job.text_encoder.encode(captions)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234))
    losses = []
    with torch.no_grad():
        for t in TIMESTEPS:
            x_t, target = add_noise(x0, noise, t)
            pred = job.model(x_t, torch.full((scenes,), t), text, mask).prediction
            losses.append(flow_matching_loss(pred, target).item())
    return statistics.mean(losses)


def geneval(checkpoint: Path, out: Path, prompts: Path, *extra: str) -> dict:
    code = sample_ecdit.main([str(checkpoint), str(out), "--prompts", str(prompts),
                              "--compute-maps", "0", *extra])
    assert code == 0, code
    return evaluate_folder(out)


def forward_flops(job) -> float:
    """FLOPs of one forward pass of one image (the sampler's unit of work)."""
    m = job.cfg.model
    x = torch.zeros(1, m.in_channels, m.input_size, m.input_size)
    text, mask = job.text_encoder.encode(["a red circle"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        job.model(x, torch.full((1,), 0.5), text, mask)
    return counter.get_total_flops()


def compute_allocation(job, prompts: list[str]) -> dict:
    """Mean experts per token on object pixels and on background, per MoE block and timestep,
    over the images generated for `prompts` (objects: the detector's coloured pixels)."""
    images, maps = job.generate(prompts, range(len(prompts)),
                                job.cfg.train.compute_map_timesteps)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    objects = np.stack([color_map(p) > 0 for p in pixels])  # (B, H, W)
    size = objects.shape[-1]
    table = {}
    for t, layers in sorted(maps.items(), reverse=True):
        for block, counts in sorted(layers.items()):
            grid = int(round(counts.shape[1] ** 0.5))
            per_pixel = counts.float().view(-1, grid, grid).repeat_interleave(
                size // grid, 1).repeat_interleave(size // grid, 2).numpy()
            table[(block, round(t, 2))] = (float(per_pixel[objects].mean()),
                                           float(per_pixel[~objects].mean()))
    return table


def sampling_seconds(job, prompts: list[str], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        job.generate(prompts, range(len(prompts)))
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", default="runs/paper")
    parser.add_argument("--per-task", type=int, default=8, help="held-out prompts per task")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    records = evaluation_prompts(per_task=args.per_task)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = [(v, 0) for v in VARIANTS] + [(EC, s) for s in SEEDS[1:]]
    rows = {}
    for variant, seed in runs:
        name = run_name(variant, seed)
        folder = out / name
        if not (folder / "finished").is_file():
            train(load_config(ROOT / "examples/configs/demo.yaml", [
                *VARIANTS[variant], f"train.steps={args.steps}", f"train.seed={seed}",
                f"train.output_dir={folder}", "train.progress=false",
                "train.tensorboard=false", "checkpoint.save_interval=0"]))
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
        job = sample_ecdit.load_job(str(folder / "checkpoints"), [], "ema")
        score = geneval(folder / "checkpoints", out / f"{name}-geneval", prompts)
        rows[(variant, seed)] = {
            "heldout_loss": heldout_loss(job),
            "geneval": score["overall"], "tasks": score["tasks"],
            "samples_per_s": statistics.median(r["samples_per_s"] for r in metrics[len(metrics) // 2:]),
            "train_loss": statistics.mean(r["loss"] for r in metrics[-50:])}
        print(name, json.dumps(rows[(variant, seed)]), flush=True)

    print("\n### Same data, steps and seed; EMA weights\n")
    print("| variant | held-out flow loss | GenEval-style overall | train samples/s |")
    print("|---|---|---|---|")
    for (variant, seed), r in rows.items():
        if seed == 0:
            print(f"| {variant} | {r['heldout_loss']:.4f} | {r['geneval']:.3f} "
                  f"| {r['samples_per_s']:.0f} |")
    spread = [rows[(EC, s)] for s in SEEDS]
    for key in ("heldout_loss", "geneval"):
        values = [r[key] for r in spread]
        print(f"\nseed spread of {EC} ({key}): {', '.join(f'{v:.4f}' for v in values)}; "
              f"max - min {max(values) - min(values):.4f}")

    ec = out / run_name(EC, 0) / "checkpoints"
    print("\n### Inference capacity sweep (trained at f_c = 2)\n")
    print("| f_c at inference | GenEval-style overall | forward GFLOPs per image |")
    print("|---|---|---|")
    sweep = []
    for f in SWEEP:
        score = geneval(ec, out / f"sweep-{f}", prompts, "--capacity-factor", str(f))
        job = sample_ecdit.load_job(str(ec), [f"moe.capacity_factor={f}"], "ema")
        sweep.append((f, score["overall"], forward_flops(job) / 1e9))
        print(f"| {f} | {sweep[-1][1]:.3f} | {sweep[-1][2]:.3f} |", flush=True)

    print("\n### Experts per token: object pixels against background\n")
    job = sample_ecdit.load_job(str(ec), [], "ema")
    table = compute_allocation(job, [r["prompt"] for r in records])
    print("| MoE block | t | objects | background | ratio |")
    print("|---|---|---|---|---|")
    for (block, t), (obj, bg) in table.items():
        print(f"| {block} | {t} | {obj:.2f} | {bg:.2f} | {obj / bg:.2f} |")

    print("\n### Sampling time, EC against dense of equal activated compute\n")
    dense = sample_ecdit.load_job(str(out / run_name(DENSE, 0) / "checkpoints"), [], "ema")
    batch = [r["prompt"] for r in records[:16]]
    seconds = {}
    for _ in range(2):  # interleaved, best of each
        for name, j in ((EC, job), (DENSE, dense)):
            seconds[name] = min(seconds.get(name, 1e9), sampling_seconds(j, batch, repeats=1))
    print(f"EC {seconds[EC]:.2f} s, dense {seconds[DENSE]:.2f} s for {len(batch)} images x "
          f"{job.cfg.diffusion.sample_steps} steps: overhead {seconds[EC] / seconds[DENSE] - 1:+.1%}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([s[2] for s in sweep], [s[1] for s in sweep], "o-")
    for f, score, flops in sweep:
        ax.annotate(f"f_c={f}", (flops, score), fontsize=7)
    ax.set_xlabel("forward GFLOPs per image")
    ax.set_ylabel("GenEval-style overall")
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "capacity_sweep.png", dpi=120)


if __name__ == "__main__":
    main()
