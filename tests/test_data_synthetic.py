"""Synthetic shards and the webdataset reader: determinism, caption/metadata/pixel agreement,
shape and range of decoded samples, and the data-parallel split."""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_ecdit.data.shards import build_dataloader, build_image_text_dataset
from megatron_ecdit.data.synthetic import (
    TASKS,
    render_scene,
    write_missing_synthetic_shards,
    write_synthetic_shards,
)

# Written out here rather than imported, so the checks do not reuse the generator's tables.
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPE_WORDS = {"circle", "square", "triangle"}
COUNT_WORDS = {"two": 2, "three": 3, "four": 4}
SIZE = 32


def centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def check_caption(caption: str, meta: dict) -> None:
    """Parse the caption with its own grammar and compare it with the metadata."""
    objs, task = meta["objects"], meta["task"]
    if task == "counting":
        m = re.fullmatch(r"(two|three|four) (\w+) (\w+)s", caption)
        assert m, caption
        assert len(objs) == COUNT_WORDS[m[1]]
        assert all(o["color"] == m[2] and o["shape"] == m[3] for o in objs)
        return
    if task == "position":
        m = re.fullmatch(r"a (\w+) (\w+) (left of|right of|above|below) a (\w+) (\w+)", caption)
        assert m, caption
        a, b = objs
        assert (a["color"], a["shape"], b["color"], b["shape"]) == (m[1], m[2], m[4], m[5])
        (ax, ay), (bx, by) = centre(a["bbox"]), centre(b["bbox"])
        dx, dy = ax - bx, ay - by
        expected = {"left of": (dx < 0 and abs(dx) > abs(dy)),
                    "right of": (dx > 0 and abs(dx) > abs(dy)),
                    "above": (dy < 0 and abs(dy) > abs(dx)),
                    "below": (dy > 0 and abs(dy) > abs(dx))}
        assert expected[m[3]], (caption, a["bbox"], b["bbox"])
        return
    parts = caption.split(" and ")
    assert len(parts) == len(objs) == (1 if task in ("single_object", "colors") else 2)
    for part, obj in zip(parts, objs):
        words = part.split()
        assert words[0] == "a" and words[-1] == obj["shape"] and words[-1] in SHAPE_WORDS
        stated = task in ("colors", "color_attr")
        assert words[1:-1] == ([obj["color"]] if stated else []), caption
    if task in ("two_objects", "color_attr"):
        assert objs[0]["shape"] != objs[1]["shape"]
    if task == "color_attr":
        assert objs[0]["color"] != objs[1]["color"]


def check_pixels(image: Image.Image, meta: dict) -> None:
    """The pixel at each bbox centre has the object's colour; boxes lie inside the image and
    do not overlap."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    boxes = [o["bbox"] for o in meta["objects"]]
    for obj, (x0, y0, x1, y1) in zip(meta["objects"], boxes):
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
        assert x1 - x0 >= 10 and y1 - y0 >= 10  # recognisable at 32x32
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        assert np.abs(pixels[cy, cx] - RGB[obj["color"]]).max() < 40, (obj, pixels[cy, cx])
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_scenes_agree_with_captions_and_pixels():
    rng = random.Random(123)
    tasks = Counter()
    for _ in range(600):
        image, caption, meta = render_scene(rng, SIZE)
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        check_caption(caption, meta)
        check_pixels(image, meta)
        tasks[meta["task"]] += 1
    assert set(tasks) == set(TASKS), tasks
    assert min(tasks.values()) > 50, tasks


def test_render_scene_accepts_numpy_generator():
    a = render_scene(np.random.default_rng(5), SIZE)
    b = render_scene(np.random.default_rng(5), SIZE)
    assert a[1:] == b[1:] and a[0].tobytes() == b[0].tobytes()


def read_tar(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_deterministic_and_img2dataset_layout(tmp_path):
    first = write_synthetic_shards(tmp_path / "a", 2, 20, seed=7)
    second = write_synthetic_shards(tmp_path / "b", 2, 20, seed=7)
    other = write_synthetic_shards(tmp_path / "c", 2, 20, seed=8)
    assert [p.rsplit("/", 1)[1] for p in first] == ["000000.tar", "000001.tar"]
    for p, q, r in zip(first, second, other):
        assert open(p, "rb").read() == open(q, "rb").read()
        assert read_tar(p) != read_tar(r)
    files = read_tar(first[1])
    assert len(files) == 60
    keys = sorted({name.split(".")[0] for name in files})
    assert keys == [f"00001{i:04d}" for i in range(20)]
    for key in keys:
        meta = json.loads(files[f"{key}.json"])
        caption = files[f"{key}.txt"].decode()
        assert meta["key"] == key and meta["status"] == "success"
        assert meta["caption"] == caption and (meta["width"], meta["height"]) == (SIZE, SIZE)
        check_caption(caption, meta)
        check_pixels(Image.open(io.BytesIO(files[f"{key}.png"])), meta)


def test_shard_depends_only_on_seed_and_index(tmp_path):
    [alone] = write_missing_synthetic_shards(str(tmp_path / "x" / "000003.tar"), 10, seed=1)
    both = write_synthetic_shards(tmp_path / "y", 4, 10, seed=1)
    assert open(alone, "rb").read() == open(both[3], "rb").read()
    assert write_missing_synthetic_shards(str(tmp_path / "x" / "{000002..000003}.tar"), 10,
                                          seed=1) == [str(tmp_path / "x" / "000002.tar")]


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, 4, 25, seed=0)
    return str(out / "{000000..000003}.tar")


def take(dataset, n):
    return list(islice(iter(dataset), n))


def test_reader_shapes_and_ranges(shard_urls):
    samples = take(build_image_text_dataset(shard_urls, SIZE, seed=0, shuffle_buffer=16), 30)
    for s in samples:
        assert s["image"].shape == (3, SIZE, SIZE) and s["image"].dtype == torch.float32
        assert s["image"].min() >= -1 and s["image"].max() <= 1
        assert s["image"].max() == 1  # white background
        assert isinstance(s["caption"], str) and s["caption"]
        assert re.fullmatch(r"\d{9}", s["key"])
    # Resizing: a 16x16 read of a 32x32 shard.
    small = take(build_image_text_dataset(shard_urls, 16, seed=0, shuffle_buffer=1), 1)[0]
    assert small["image"].shape == (3, 16, 16)


def test_reader_deterministic(shard_urls, monkeypatch):
    def keys(seed, workers=0):
        dataset = build_image_text_dataset(shard_urls, SIZE, seed=seed, shuffle_buffer=16)
        loader = build_dataloader(dataset, batch_size=8, num_workers=workers)
        batches = list(islice(iter(loader), 15))  # 120 samples: more than one pass
        assert batches[0]["image"].shape == (8, 3, SIZE, SIZE)
        assert isinstance(batches[0]["caption"], list)
        return [k for b in batches for k in b["key"]]

    baseline = keys(0)
    assert keys(0) == baseline
    assert keys(1) != baseline
    assert keys(0, workers=2) == keys(0, workers=2)
    # The global rank does not enter: only the dp_rank argument splits the data.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert keys(0) == baseline


@pytest.mark.parametrize("workers", [0, 2])
def test_dp_split_covers_every_key_once(shard_urls, workers):
    seen = []
    for rank in range(2):
        dataset = build_image_text_dataset(shard_urls, SIZE, seed=3, shuffle_buffer=10,
                                           dp_rank=rank, dp_size=2, resampled=False)
        loader = build_dataloader(dataset, batch_size=5, num_workers=workers)
        rank_keys = [k for batch in loader for k in batch["key"]]
        assert rank_keys  # each rank gets data
        seen += rank_keys
    assert sorted(seen) == sorted(f"{s:05d}{i:04d}" for s in range(4) for i in range(25))
