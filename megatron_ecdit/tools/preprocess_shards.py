"""Encode image-text shards once into VAE latents and text embeddings, for faster training.

Example, from the repository root (the encoders and image size come from the training config,
so the latents match what training would compute):
    python tools/preprocess_shards.py --config examples/configs/demo.yaml \
        --input 'data/synthetic/{000000..000007}.tar' --output data/latents --workers 2
then train with data.urls='data/latents/{000000..000007}.tar' (data.format=auto detects them).
Run it again to finish an interrupted run: complete outputs are skipped. Exit status 1 if a
shard could not be read (it is left unwritten; rerun to retry). See
megatron_ecdit/data/preprocess.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megatron_ecdit.config import ConfigError, load_config
from megatron_ecdit.data.bad_input import describe_counts
from megatron_ecdit.data.preprocess import (
    output_name,
    preprocess_shards,
    summarize,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="training config YAML (default: the embedded default)")
    parser.add_argument("--input", help="input shard URLs (default: the config's data.urls)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--workers", type=int, default=0,
                        help="encoding processes; 0 = in this process (default)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="storage type of latents and embeddings")
    parser.add_argument("overrides", nargs="*",
                        help="dotted config overrides, e.g. text_encoder.max_length=64")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    urls = args.input or cfg.data.urls
    reports = preprocess_shards(urls, args.output, text_cfg=cfg.text_encoder, vae_cfg=cfg.vae,
                                image_size=cfg.data.image_size, workers=args.workers,
                                batch_size=args.batch_size, dtype=args.dtype)
    for r in reports:
        detail = f"{r.samples} samples; {describe_counts(r.counts)}" if r.status != "skipped" \
            else "already done"
        print(f"{r.status:>7}  {r.output}  ({detail})")
    total = summarize(reports)
    print(f"{total['written']} shards written, {total['skipped']} skipped (done before), "
          f"{total['failed']} failed; {total['samples']} samples written; "
          f"{describe_counts(total['counts'])}")
    parts = [str(Path(args.output) / output_name(part)) for part in urls.split("::")]
    print(f"train with: data.urls='{'::'.join(parts)}'")
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
