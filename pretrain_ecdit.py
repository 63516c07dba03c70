"""Pretrain EC-DiT.

    python pretrain_ecdit.py --config examples/configs/demo.yaml key.sub=value ...

With no --config the embedded default (a tiny EC-DiT on synthetic shapes) is trained.

Exit codes: 0 the run reached train.steps (or had already: OUTPUT_DIR/finished exists);
75 (sysexits' EX_TEMPFAIL) it stopped early on SIGTERM/SIGUSR1 or its time limit after saving a
checkpoint, or a peer was lost (a failed collective) or a rank hung past train.hang_timeout_s
(training/watchdog.py): resume it (examples/slurm/pretrain_ecdit.sbatch requeues itself); 2 a
config or layout error, found before anything is built; 1 a bad checkpoint, bad data, or more
non-finite steps in a row than train.max_skipped_steps (not resumable: the same data would
come again).
"""

import argparse
import sys

from megatron_ecdit.config import ConfigError, load_config


EXIT_RESUME = 75  # stopped early after saving: run again to resume


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
    from megatron_ecdit.training.nonfinite import SkippedStepsError
    from megatron_ecdit.training.trainer import train
    from megatron_ecdit.training.watchdog import RESUME_HINT, lost_peer
    try:
        summary = train(cfg)
    except ConfigError as err:  # e.g. a layout the world size or the model cannot take
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:  # raised alike on every rank: one of them says it
        import torch.distributed as dist
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except SkippedStepsError as err:  # alike on every rank (a RuntimeError, not a lost peer)
        import torch.distributed as dist
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        import torch.distributed as dist
        rank = dist.get_rank() if dist.is_initialized() else 0
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"rank {rank}: a collective failed, a peer is lost or stuck ({first}); exiting "
              f"with {EXIT_RESUME}, {RESUME_HINT}", file=sys.stderr, flush=True)
        return EXIT_RESUME
    return EXIT_RESUME if summary["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
