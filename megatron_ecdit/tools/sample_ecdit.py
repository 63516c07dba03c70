"""Generate images from a checkpoint: one PNG per image, a grid, and what was generated.

    ecdit-sample outputs/demo/checkpoints samples/ [--prompts FILE | --prompt TEXT ...] \
        [--seed 0] [--images-per-prompt 1] [--batch-size N] [--cfg-scale 4] [--steps 25] \
        [--sampler euler|heun] [--capacity-factor F [F ...]] [--weights ema|model] \
        [--compute-maps N] [--precision fp32|bf16]
    ecdit-evaluate score samples/
    torchrun --nproc-per-node 4 -m megatron_ecdit.tools.sample_ecdit CKPT OUT \
        parallel.tp=2 parallel.ep=2                  (a model too big for one device)
(or python tools/sample_ecdit.py ...). Trailing KEY=VALUE arguments are config overrides, e.g.
the layout to sample at under torchrun (one process's layout unless given); rank 0 writes.
The checkpoint is a training checkpoint of any layout (a `step_N` folder, a checkpoints folder
or its `latest` pointer) or an exported folder (`ecdit-convert export`, a model or a pipeline
folder). Prompts come from a file (one per line, or GenEval metadata records as JSON lines,
e.g. examples/prompts/geneval_synthetic.jsonl) or the command line; by default the run's own
sample prompts. `--capacity-factor` overrides the trained capacity factors at inference: one
value for every MoE block or one per block. The model is loaded without an optimizer and
without a separate EMA copy: each rank holds its share of one set of weights.

Images are made by the training job's own sampler (`Job.generate`: EMA weights loaded as the
model, classifier-free guidance). Every image has its own seed: with `--seed S`, the k-th image
(prompt by prompt, then again for each further image per prompt) starts from noise drawn from
seed S + k alone, recorded in metadata.jsonl. An image is therefore a function of its prompt,
its seed and the settings: drawn alone (`--prompt P --seed s`), in any batch size, in one
process or under torchrun at any layout, it comes out the same up to rounding (with
`moe.pool: sample`, the paper's per-image expert choice; a `group` or `micro_batch` pool makes
experts choose across images by design). The run's sample prompts at seed 0 give exactly the
images it drew at the end of training (prompt i with seed i). Writes OUT/NNNNN.png, OUT/grid.png
(the first 32 images), OUT/metadata.jsonl (each input record with its image, seed and
settings: what ecdit-evaluate reads) and OUT/compute_map.png (experts per token for the first images, at the
run's compute-map timesteps).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from megatron_ecdit.checkpoint import consolidated
from megatron_ecdit.checkpoint import distributed as checkpoints
from megatron_ecdit.checkpoint.distributed import CheckpointError
from megatron_ecdit.config import ConfigError, load_config
from megatron_ecdit.evaluation.geneval import EvaluationError, read_jsonl

GRID_IMAGES = 32  # grid.png shows the first images only


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Prompt records ({"prompt": ...} and any metadata) of a .jsonl file or a text file with
    one prompt per line."""
    if path.endswith(".jsonl"):
        records = read_jsonl(path)
        for number, record in enumerate(records, 1):
            if not isinstance(record.get("prompt"), str):
                raise EvaluationError(f"{path}: record {number} has no \"prompt\" string")
        return records
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationError(f"cannot read {path}: {err}") from None
    return [{"prompt": line.strip()} for line in lines if line.strip()]


def load_job(checkpoint: str, overrides: list[str], weights: str):
    """A job without an optimizer at the layout `overrides` give (one process's otherwise)
    whose model holds the checkpoint's weights (`weights`: its EMA or raw weights; an export
    holds one set); each rank reads only its part of them."""
    from megatron_ecdit.training.trainer import Job

    if consolidated.is_export(checkpoint):
        exported = consolidated.open_export(checkpoint)
        job = Job(load_config(base=exported.cfg.to_dict(), overrides=[
            *consolidated.one_process_overrides(), *overrides]), train=False)
        job.load_exported(exported.weights)
        return job
    common = checkpoints.read_common(checkpoint)
    job = Job(load_config(base=common["config"],
                          overrides=[*consolidated.one_process_overrides(), *overrides]),
              train=False)
    checkpoints.load_weights(checkpoint, job.chunks, which=weights)
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. the layout under torchrun")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", help="a .jsonl file of records with a prompt, or a text "
                                          "file with one prompt per line")
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the first image's seed; image k has seed + k")
    parser.add_argument("--images-per-prompt", type=int, default=1,
                        help="draw the prompts this many times (each image its own seed)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: the number "
                        "of prompts); it changes no image")
    parser.add_argument("--cfg-scale", type=float)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--sampler", choices=("euler", "heun"))
    parser.add_argument("--capacity-factor", type=float, nargs="+",
                        help="one for every MoE block, or one per MoE block")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="of a training checkpoint (an exported folder has one set)")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="the model's parameters and activations (default: the run's "
                             "train.precision)")
    parser.add_argument("--compute-maps", type=int, help="images in compute_map.png, from the "
                        "first batch (default: the run's train.compute_map_prompts; 0: none)")
    args = parser.parse_args(argv)
    overrides = [*args.overrides] + [f"{key}={value}" for key, value in (
        ("diffusion.cfg_scale", args.cfg_scale), ("diffusion.sample_steps", args.steps),
        ("diffusion.sampler", args.sampler), ("train.precision", args.precision))
        if value is not None]
    factors = args.capacity_factor
    if factors is not None:
        overrides += ([f"moe.capacity_factor={factors[0]}", "moe.layer_capacity_factors=null"]
                      if len(factors) == 1 else [f"moe.layer_capacity_factors={factors}"])
    try:
        records = (read_prompts(args.prompts) if args.prompts
                   else [{"prompt": p} for p in args.prompt or []])
        job = load_job(args.checkpoint, overrides, args.weights)
    except (CheckpointError, ConfigError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return generate(job, records or [{"prompt": p} for p in job.cfg.train.sample_prompts],
                    args, Path(args.out))


def generate(job, records: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> int:
    import torch

    from megatron_ecdit.training.visualize import save_compute_map, save_sample_grid, to_uint8

    cfg = job.cfg
    num_moe = len(cfg.moe.moe_layer_indices(cfg.model.num_layers))
    settings = {"checkpoint": str(args.checkpoint), "weights": args.weights,
                "cfg_scale": cfg.diffusion.cfg_scale, "steps": cfg.diffusion.sample_steps,
                "sampler": cfg.diffusion.sampler, "precision": cfg.train.precision,
                "capacity_factors": [cfg.moe.capacity_factor_of(i) for i in range(num_moe)]}
    # Image k: the records in order, again for each further image per prompt; seed S + k.
    todo = [(record, args.seed + k) for k, record in enumerate(records * args.images_per_prompt)]
    size = args.batch_size or len(records)
    batches = [todo[start:start + size] for start in range(0, len(todo), size)]
    n_maps = cfg.train.compute_map_prompts if args.compute_maps is None else args.compute_maps
    writer = job.is_writer  # every rank samples (collectives); rank 0 writes
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    written, grid, wrote = [], [], ["grid.png", "metadata.jsonl"]
    for batch in tqdm(batches, desc="sample", unit="batch", disable=not writer):
        prompts = [record["prompt"] for record, _ in batch]
        seeds = [seed for _, seed in batch]
        images, maps = job.generate(prompts, seeds, cfg.train.compute_map_timesteps)
        if writer and not written and n_maps > 0 and maps and next(iter(maps.values())):
            save_compute_map(images[:n_maps], prompts[:n_maps],
                             {t: {k: v[:n_maps] for k, v in layer_maps.items()}
                              for t, layer_maps in maps.items()},
                             cfg.moe.num_experts, out / "compute_map.png")
            wrote.append("compute_map.png")
        grid.append(images[:GRID_IMAGES - sum(len(g) for g in grid)])
        for (record, seed), image in zip(batch, to_uint8(images)):
            name = f"{len(written):05d}.png"
            if writer:
                Image.fromarray(image).save(out / name)
            written.append({**record, "image": name, "seed": seed, **settings})
    if writer:
        grid_images = torch.cat(grid)
        save_sample_grid(grid_images, [r["prompt"] for r in written[:len(grid_images)]],
                         out / "grid.png")
        (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in written))
        print(f"wrote {len(written)} images, {', '.join(wrote)} to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
