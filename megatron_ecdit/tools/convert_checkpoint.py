"""Convert between training checkpoints (sharded, any layout) and exported diffusers folders.

Export: training checkpoint -> a diffusers model folder (config.json + sharded safetensors),
or with --pipeline a whole diffusers pipeline folder (model_index.json, transformer/,
scheduler/, text_encoder/, tokenizer/, vae/), streamed a bounded group of tensors at a time:
    ecdit-convert export outputs/demo/checkpoints exported/ [--weights ema|model] \
        [--dtype fp32|bf16] [--max-shard-size 10GB] [--pipeline]
(a `step_N` folder, a checkpoints folder or its `latest` pointer; `python
tools/convert_checkpoint.py` is the same command). The folder appears when it is complete.
Import: exported folder -> a weights-only training checkpoint at the layout of the launch,
written to OUTPUT_DIR/checkpoints/step_0000000, each rank reading only its slices; a run with
train.output_dir=OUTPUT_DIR (or train.resume=that folder) starts from those weights with fresh
optimizer state at step 0:
    torchrun --nproc-per-node 4 -m megatron_ecdit.tools.convert_checkpoint import exported/ finetune/ \
        parallel.tp=2 parallel.ep=2 [more config overrides]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_ecdit.checkpoint import consolidated
from megatron_ecdit.checkpoint.distributed import CheckpointError
from megatron_ecdit.checkpoint.exported import DEFAULT_MAX_SHARD_SIZE
from megatron_ecdit.config import ConfigError, load_config


def import_(folder: str, output_dir: str, overrides: list[str]) -> Path:
    from megatron_ecdit.training.trainer import Job

    exported = consolidated.open_export(folder)
    cfg = load_config(base=exported.run_config, overrides=[
        f"train.output_dir={output_dir}", "train.resume=never", *overrides])
    job = Job(cfg, train=False)
    job.load_exported(exported.weights)
    path = job.save(0, weights_only=True)
    if job.is_writer:
        print(f"wrote {path} ({job.layout.describe()})")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="training checkpoint -> diffusers folder")
    exp.add_argument("checkpoint")
    exp.add_argument("out")
    exp.add_argument("--weights", choices=("ema", "model"), default="ema")
    exp.add_argument("--dtype", choices=sorted(consolidated.DTYPES), default="fp32")
    exp.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                     help="largest shard, e.g. 10GB (diffusers' default) or 500MB")
    exp.add_argument("--pipeline", action="store_true",
                     help="write a whole diffusers pipeline folder (ECDiTPipeline)")
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")
    imp = sub.add_parser("import", help="exported folder -> training checkpoint")
    imp.add_argument("folder")
    imp.add_argument("output_dir")
    imp.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tp=2")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            options = dict(weights=args.weights, dtype=args.dtype,
                           max_shard_size=args.max_shard_size, progress=not args.no_progress)
            if args.pipeline:
                from megatron_ecdit.pipelines import export_pipeline
                out = export_pipeline(args.checkpoint, args.out, **options)
            else:
                out = consolidated.export(args.checkpoint, args.out, **options)
            print(f"wrote {out}/")
        else:
            import_(args.folder, args.output_dir, args.overrides)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
