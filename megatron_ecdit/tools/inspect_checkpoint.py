"""List what a checkpoint holds: step, layout, and every tensor with its full shape.

    ecdit-inspect outputs/demo/checkpoints/step_0001500 [--json]
    (or python tools/inspect_checkpoint.py ...)
Works on training checkpoints (sharded) and exported folders; reads metadata only. A
checkpoints folder, or its `latest` pointer, means the latest checkpoint in it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_ecdit.checkpoint.distributed import CheckpointError


def describe(path: Path) -> dict:
    from megatron_ecdit.checkpoint import consolidated

    if consolidated.is_export(path):
        exported = consolidated.open_export(path)
        weights = exported.weights
        tensors = {name: [list(spec.shape), str(spec.dtype).replace("torch.", "")]
                   for name in weights.names for spec in [weights.spec(name)]}
        info = exported.info
        return {"format": "exported", "folder": str(exported.folder), "step": info.get("step"),
                "layout": "one process", **{k: v for k, v in info.items() if k != "step"},
                "shards": weights.shard_files, "tensors": tensors}
    from megatron.core import dist_checkpointing

    from megatron_ecdit.checkpoint import distributed
    from megatron_ecdit.parallel.setup import init_distributed

    path = distributed.resolve_checkpoint(path)
    common = distributed.read_common(path)
    init_distributed()
    meta = dist_checkpointing.load_tensors_metadata(str(path))
    tensors = {k: [list(v.global_shape), str(v.dtype).replace("torch.", "")]
               for k, v in sorted(meta.items())}
    return {"format": "torch_dist", "path": str(path), "step": common["step"],
            "layout": common["layout"], "weights_only": common["weights_only"],
            "optimizer_backend": common["optimizer_backend"], "tensors": tensors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        info = describe(Path(args.path))
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if key != "tensors":
            print(f"{key}: {value}")
    total = 0
    for name, (shape, dtype) in info["tensors"].items():
        numel = 1
        for n in shape:
            numel *= n
        total += numel
        print(f"  {name:<70} {str(tuple(shape)):<20} {dtype}")
    print(f"{len(info['tensors'])} tensors, {total / 1e6:.2f}M values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
