"""Reading img2dataset-layout image-text shards with webdataset.

`build_image_text_dataset` turns a brace pattern of tar shards into a stream of
{"image": float32 (3, H, W) in [-1, 1], "caption": str, "key": str}. Shards are divided by the
data-parallel rank the caller passes in (not webdataset's split_by_node, which reads the global
RANK and would split across tensor/pipeline ranks too) and by DataLoader worker. All randomness
(shard order, resampling, the sample shuffle buffer) is seeded from `seed`, the rank and the
worker, so the same arguments give the same sample order.

In resampled mode (the default, for training) each (rank, worker) draws shards with
replacement from the whole list from its own seed, giving an infinite stream; ranks therefore do
not see disjoint data, only independent streams. Non-resampled mode is one pass in which every
sample reaches exactly one (rank, worker). This module does no caption filtering, no
aspect-ratio bucketing and no augmentation beyond resize and centre crop.
"""

from __future__ import annotations

import functools
import io
import random
from itertools import islice
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def build_image_text_dataset(urls: str, image_size: int, *, seed: int, shuffle_buffer: int,
                             dp_rank: int = 0, dp_size: int = 1,
                             resampled: bool = True) -> wds.DataPipeline:
    """An IterableDataset of {"image", "caption", "key"} read from the shards `urls`.

    shuffle_buffer <= 1 disables the sample shuffle (shard order is still seeded).
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if resampled:
        shards = [wds.ResampledShards(
            urls, seed=seed, deterministic=True,
            worker_seed=functools.partial(_stream_index, dp_rank, dp_size))]
    else:  # the same seeded shard order on every rank, then each takes its own slice
        shards = [wds.SimpleShardList(urls, seed=seed),
                  functools.partial(_split_shards, dp_rank=dp_rank, dp_size=dp_size)]
    stages = [*shards, wds.tarfile_to_samples()]
    if shuffle_buffer > 1:
        stages.append(_SeededShuffle(shuffle_buffer, seed, dp_rank, dp_size))
    stages += [wds.select(_has_image_and_caption),
               wds.map(functools.partial(_to_example, image_size=image_size))]
    return wds.DataPipeline(*stages)


def build_dataloader(dataset: torch.utils.data.IterableDataset, batch_size: int,
                     num_workers: int) -> torch.utils.data.DataLoader:
    """Batches of {"image": (B, 3, H, W), "caption": list[str], "key": list[str]}.

    Batches are collated inside the workers; the DataLoader takes batches from the workers in
    turn, so the order stays deterministic.
    """
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)


# --------------------------------------------------------------------------------------------
# Pipeline stages
# --------------------------------------------------------------------------------------------


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _stream_index(dp_rank: int, dp_size: int) -> int:
    """A number unique to this (data-parallel rank, DataLoader worker)."""
    worker, num_workers = _worker()
    return worker * dp_size + dp_rank


def _split_shards(src: Iterable[dict], dp_rank: int, dp_size: int) -> Iterator[dict]:
    """Keep every (dp_size * num_workers)-th shard, starting at this rank's and worker's own."""
    worker, num_workers = _worker()
    yield from islice(src, _stream_index(dp_rank, dp_size), None, dp_size * num_workers)


class _SeededShuffle(wds.PipelineStage):
    """webdataset's buffer shuffle with an rng seeded per (seed, rank, worker, epoch)."""

    def __init__(self, bufsize: int, seed: int, dp_rank: int, dp_size: int):
        self.bufsize, self.seed, self.dp_rank, self.dp_size = bufsize, seed, dp_rank, dp_size
        self.epoch = -1

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        self.epoch += 1
        stream = _stream_index(self.dp_rank, self.dp_size)
        rng = random.Random(f"shuffle/{self.seed}/{stream}/{self.epoch}")
        return wds.filters.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


def _has_image_and_caption(sample: dict[str, Any]) -> bool:
    return "txt" in sample and any(ext in sample for ext in IMAGE_EXTENSIONS)


def _to_example(sample: dict[str, Any], image_size: int) -> dict[str, Any]:
    data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
    with Image.open(io.BytesIO(data)) as image:
        image = _resize_center_crop(image.convert("RGB"), image_size)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return {"image": pixels / 127.5 - 1.0,
            "caption": sample["txt"].decode("utf-8").strip(),
            "key": sample["__key__"]}


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, then crop the centre size x size square."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))
