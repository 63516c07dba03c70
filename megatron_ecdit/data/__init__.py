"""Image-text data: synthetic shape-scene shards (synthetic.py), the webdataset shard stream with
an exact resume (shards.py), sample decoding (decode.py), bad-input accounting (bad_input.py)
and the one-off encoding of shards into latents and text embeddings (preprocess.py)."""

from megatron_ecdit.data.bad_input import BAD_KINDS, DataError, describe_counts
from megatron_ecdit.data.shards import (
    BatchStream,
    build_dataloader,
    build_image_text_dataset,
    detect_format,
)
from megatron_ecdit.data.synthetic import (
    caption_from_metadata,
    render_scene,
    write_missing_synthetic_shards,
    write_synthetic_shards,
)

__all__ = [
    "BAD_KINDS",
    "BatchStream",
    "DataError",
    "build_dataloader",
    "build_image_text_dataset",
    "caption_from_metadata",
    "describe_counts",
    "detect_format",
    "render_scene",
    "write_missing_synthetic_shards",
    "write_synthetic_shards",
]
