"""Convert between training checkpoints (sharded, any layout) and the consolidated format.

Export: training checkpoint -> one folder with config.json + model.safetensors (one process):
    ecdit-convert export outputs/demo/checkpoints exported/ [--weights ema|model] \
        [--dtype fp32|bf16]
(a `step_N` folder, a checkpoints folder or its `latest` pointer; `python
tools/convert_checkpoint.py` is the same command).
Import: consolidated folder -> a weights-only training checkpoint at the layout of the launch,
written to OUTPUT_DIR/checkpoints/step_0000000; a run with train.output_dir=OUTPUT_DIR (or
train.resume=that folder) starts from those weights with fresh optimizer state at step 0:
    torchrun --nproc-per-node 4 -m megatron_ecdit.tools.convert_checkpoint import exported/ finetune/ \
        parallel.tp=2 parallel.ep=2 [more config overrides]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_ecdit.checkpoint import consolidated
from megatron_ecdit.checkpoint.distributed import CheckpointError
from megatron_ecdit.config import ConfigError, load_config


def import_(folder: str, output_dir: str, overrides: list[str]) -> Path:
    import json

    from megatron_ecdit.training.trainer import Job

    _, state, _ = consolidated.read(folder)
    saved = json.loads((Path(folder) / "config.json").read_text())["config"]
    cfg = load_config(base=saved, overrides=[f"train.output_dir={output_dir}",
                                             "train.resume=never", *overrides])
    job = Job(cfg)
    job.load_full_weights(state)
    path = job.save(0, weights_only=True)
    if job.is_writer:
        print(f"wrote {path} ({job.layout.describe()})")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="training checkpoint -> consolidated folder")
    exp.add_argument("checkpoint")
    exp.add_argument("out")
    exp.add_argument("--weights", choices=("ema", "model"), default="ema")
    exp.add_argument("--dtype", choices=sorted(consolidated.DTYPES), default="fp32")
    imp = sub.add_parser("import", help="consolidated folder -> training checkpoint")
    imp.add_argument("folder")
    imp.add_argument("output_dir")
    imp.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tp=2")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            out = consolidated.export(args.checkpoint, args.out, weights=args.weights,
                                      dtype=args.dtype)
            print(f"wrote {out}/config.json and {out}/{consolidated.WEIGHTS}")
        else:
            import_(args.folder, args.output_dir, args.overrides)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
