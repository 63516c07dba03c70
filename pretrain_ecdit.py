"""Pretrain EC-DiT.

    python pretrain_ecdit.py --config examples/configs/demo.yaml key.sub=value ...

With no --config the embedded default (a tiny EC-DiT on synthetic shapes) is trained.
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from megatron_ecdit.config import ConfigError, load_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a YAML config (default: the embedded default)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from megatron_ecdit.checkpoint.distributed import CheckpointError
    from megatron_ecdit.data.bad_input import DataError
    from megatron_ecdit.training.trainer import train
    try:
        train(cfg)
    except (CheckpointError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
