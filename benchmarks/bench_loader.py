"""Shard loader throughput against the rate at which the default model trains. Prints a table.

    python benchmarks/bench_loader.py [--shards 4] [--per-shard 1000] [--batches 200]

In one process: writes synthetic 32x32 shards (the demo's data), preprocesses them with
tools/preprocess_shards.py's code (identity VAE and the MiniLM text encoder, the demo's
encoders), then reads batches of 16 with `BatchStream` from the raw and the preprocessed
shards with 0, 1 and 2 DataLoader workers (default shuffle buffer, resampled). The baseline is
the training consumption rate of the embedded default config: one-process training steps of
`ECDiT(ModelConfig(), MoEConfig())` on batches of 16 (text encoding with its cache, rectified
flow noise, forward, backward, clipping, AdamW), timed after warm-up. Also reported: the time
a resume takes to its first batch (fast-forward, which includes refilling the shuffle buffer)
and the preprocessing rate.
Goal from the issue: preprocessed shards load at >= 10x the training rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_ecdit.config import Config, DataConfig  # noqa: E402
from megatron_ecdit.data.preprocess import preprocess_shards  # noqa: E402
from megatron_ecdit.data.shards import BatchStream  # noqa: E402
from megatron_ecdit.data.synthetic import write_synthetic_shards  # noqa: E402
from megatron_ecdit.diffusion.rectified_flow import (  # noqa: E402
    add_noise,
    flow_matching_loss,
    sample_timesteps,
)
from megatron_ecdit.encoders import TextEncoder  # noqa: E402
from megatron_ecdit.models.ecdit import ECDiT  # noqa: E402
from megatron_ecdit.parallel.layout import ParallelLayout  # noqa: E402
from megatron_ecdit.parallel.setup import initialize_parallel  # noqa: E402
from megatron_ecdit.parallel.backends.one_process import TorchOptimizer  # noqa: E402

BATCH = 16


def take(batches, n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


def open_stream(urls: str, workers: int, cfg: Config) -> BatchStream:
    side = cfg.data.image_size
    return BatchStream(DataConfig(urls=urls, image_size=side, num_workers=workers), BATCH,
                       dp_rank=0, dp_size=1, latent_shape=(3, side, side),
                       text_shape=(cfg.text_encoder.max_length, cfg.model.text_dim))


def loader_rate(urls: str, workers: int, batches: int, cfg: Config) -> float:
    """Samples per second after the workers start and the shuffle buffer fills."""
    stream = open_stream(urls, workers, cfg)
    take(stream, 2 + 2 * workers)
    start = time.perf_counter()
    take(stream, batches)
    return batches * BATCH / (time.perf_counter() - start)


def resume_time(urls: str, batches: int, cfg: Config) -> tuple[int, float]:
    """Items a resume after `batches` batches skips, and the seconds to its first batch."""
    first = open_stream(urls, 0, cfg)
    take(first, batches)
    state = first.state_dict()
    resumed = open_stream(urls, 0, cfg)
    resumed.load_state_dict(state)
    start = time.perf_counter()
    next(resumed)
    return state["workers"][0]["seen"], time.perf_counter() - start


def training_rate(batch: dict, text_encoder: TextEncoder, steps: int, cfg: Config) -> float:
    """Samples per second of one-process training steps of the default model."""
    ctx = initialize_parallel(ParallelLayout.build(cfg, world_size=1))
    torch.manual_seed(0)
    model = ECDiT(cfg.model, cfg.moe, ctx)
    optimizer = TorchOptimizer(model, cfg.optim)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        x0 = batch["image"]  # identity VAE
        text, mask = text_encoder.encode(batch["caption"])
        t = sample_timesteps(BATCH, cfg.diffusion.logit_mean, cfg.diffusion.logit_std, generator=g)
        x_t, target = add_noise(x0, torch.randn(x0.shape, generator=g), t)
        optimizer.zero_grad()
        optimizer.backward(flow_matching_loss(model(x_t, t, text, mask).prediction, target))
        optimizer.step(cfg.optim.lr)

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=200, help="batches timed per reading")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed")
    args = parser.parse_args()
    cfg = Config()
    with tempfile.TemporaryDirectory() as tmp:
        names = f"{{000000..{args.shards - 1:06d}}}.tar"
        write_synthetic_shards(Path(tmp) / "raw", args.shards, args.per_shard,
                               cfg.data.image_size)
        raw, pre = f"{tmp}/raw/{names}", f"{tmp}/pre/{names}"
        start = time.perf_counter()
        preprocess_shards(raw, f"{tmp}/pre", text_cfg=cfg.text_encoder, vae_cfg=cfg.vae,
                          image_size=cfg.data.image_size)
        preprocess = args.shards * args.per_shard / (time.perf_counter() - start)

        text_encoder = TextEncoder(cfg.text_encoder.path, cfg.text_encoder.tokenizer_path,
                                   cfg.text_encoder.max_length)
        train = training_rate(next(open_stream(raw, 0, cfg)), text_encoder, args.steps, cfg)
        rows = [(fmt, workers, loader_rate(urls, workers, args.batches, cfg))
                for fmt, urls in (("raw", raw), ("preprocessed", pre)) for workers in (0, 1, 2)]
        resume = {fmt: resume_time(urls, 2 * args.batches, cfg)
                  for fmt, urls in (("raw", raw), ("preprocessed", pre))}

    print(f"training consumption (default config, batch {BATCH}, {torch.get_num_threads()} "
          f"threads): {train:.1f} samples/s ({train / BATCH:.2f} steps/s)")
    print("\n| shards | workers | samples/s | x training |\n|---|---|---|---|")
    for fmt, workers, rate in rows:
        print(f"| {fmt} | {workers} | {rate:.0f} | {rate / train:.1f}x |")
    print()
    for fmt, (items, seconds) in resume.items():
        print(f"resume of {fmt} shards after {items} items (0 workers): first batch in "
              f"{seconds:.2f} s ({items / seconds:.0f} items/s skipped)")
    print(f"preprocessing (identity VAE + MiniLM, 1 process): {preprocess:.0f} samples/s")


if __name__ == "__main__":
    main()
