"""Image-text data: synthetic shape-scene shards (synthetic.py) and the webdataset reader for
img2dataset-layout shards (shards.py)."""

from megatron_ecdit.data.shards import build_dataloader, build_image_text_dataset
from megatron_ecdit.data.synthetic import (
    caption_from_metadata,
    render_scene,
    write_missing_synthetic_shards,
    write_synthetic_shards,
)

__all__ = [
    "build_dataloader",
    "build_image_text_dataset",
    "caption_from_metadata",
    "render_scene",
    "write_missing_synthetic_shards",
    "write_synthetic_shards",
]
