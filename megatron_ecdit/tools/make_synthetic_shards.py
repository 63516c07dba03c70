"""Write synthetic shape-scene shards (img2dataset layout) for the EC-DiT demo.

Example, from the repository root:
    python tools/make_synthetic_shards.py --out data/synthetic --num-shards 8 \
        --samples-per-shard 1000 --image-size 32 --seed 0
The shards are byte-identical for the same arguments. See megatron_ecdit/data/synthetic.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ecdit.data.synthetic import write_synthetic_shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-shards", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_synthetic_shards(args.out, args.num_shards, args.samples_per_shard,
                                   args.image_size, args.seed)
    total = args.num_shards * args.samples_per_shard
    print(f"wrote {len(paths)} shards, {total} samples of {args.image_size}x{args.image_size} "
          f"(seed {args.seed}):")
    for path in paths:
        print(f"  {path}")
    if paths:
        print(f"urls: {Path(args.out) / f'{{000000..{len(paths) - 1:06d}}}.tar'}")


if __name__ == "__main__":
    main()
