"""Synthetic image-text shards: rendered scenes of simple shapes with GenEval-style captions.

Every scene is a few saturated shapes on a white background, captioned for one of GenEval's six
task types (single_object, two_objects, counting, colors, position, color_attr). The vocabulary
is deliberately tiny (three shapes, four colours) so that a small model trained for minutes on a
CPU at 32x32 pixels can learn it. A fixed part of the position and color_attr captions (about a
fifth) is never drawn (`held_out`), so that a model can be scored on compositions it never saw.
Scenes are a pure function of a seed; shards are written with webdataset's TarWriter in
img2dataset's layout (KEY.png, KEY.txt, KEY.json) and are byte-identical for the same seed.
Each shard depends only on (seed, shard index), so shards can be written independently. The
caption is always derived from the metadata by `caption_from_metadata`, so the two cannot
disagree.

This module does not read shards (see shards.py), does not score generated images, and does not
try to look like photographs: no textures, occlusion, rotation or background clutter.
"""

from __future__ import annotations

import os
import random
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
BACKGROUND = (255, 255, 255)
TASKS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
HELD_OUT_TASKS = ("position", "color_attr")  # part of their captions: see held_out()

SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled with LANCZOS (antialiasing)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def caption_from_metadata(meta: dict[str, Any]) -> str:
    """The caption of a scene, from its `task`, `objects` and (for position) `relation`."""
    task, objs = meta["task"], meta["objects"]
    if task == "single_object":
        return f"a {objs[0]['shape']}"
    if task == "colors":
        return f"a {objs[0]['color']} {objs[0]['shape']}"
    if task == "two_objects":
        return f"a {objs[0]['shape']} and a {objs[1]['shape']}"
    if task == "color_attr":
        a, b = objs
        return f"a {a['color']} {a['shape']} and a {b['color']} {b['shape']}"
    if task == "position":
        a, b = objs
        return f"a {a['color']} {a['shape']} {meta['relation']} a {b['color']} {b['shape']}"
    if task == "counting":
        return f"{NUMBER_WORDS[len(objs)]} {objs[0]['color']} {objs[0]['shape']}s"
    raise ValueError(f"unknown task {task!r}")


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


def render_scene(rng: random.Random | np.random.Generator,
                 image_size: int) -> tuple[Image.Image, str, dict[str, Any]]:
    """Draw one random scene; returns (RGB image, caption, metadata).

    Metadata holds `task`, `objects` (a list of {shape, color, bbox}, bbox = [x0, y0, x1, y1]
    in pixels, x1/y1 exclusive) and, for the position task, `relation` (object 0 relative to
    object 1). A numpy Generator is accepted and used only to seed a random.Random.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for shapes to fit, got {image_size}")
    if isinstance(rng, np.random.Generator):
        rng = random.Random(int(rng.integers(2**63)))
    task = rng.choice(TASKS)
    specs, relation = _objects(rng, task)
    while held_out(dict(task=task, objects=[dict(shape=s, color=c) for s, c in specs],
                        relation=relation)):
        specs, relation = _objects(rng, task)
    boxes = _layout(rng, len(specs), image_size, relation)
    objects = [dict(shape=s, color=c, bbox=b) for (s, c), b in zip(specs, boxes)]
    meta: dict[str, Any] = dict(task=task, objects=objects)
    if relation is not None:
        meta["relation"] = relation
    return draw_scene(objects, image_size), caption_from_metadata(meta), meta


def _objects(rng: random.Random, task: str) -> tuple[list[tuple[str, str]], str | None]:
    """A scene's (shape, colour) pairs and, for position, the relation of object 0 to 1."""
    if task in ("single_object", "colors"):
        specs = [(rng.choice(SHAPES), rng.choice(list(COLORS)))]
    elif task == "counting":
        spec = (rng.choice(SHAPES), rng.choice(list(COLORS)))
        specs = [spec] * rng.randint(2, 4)
    else:  # two objects of different shapes; different colours where colours are stated
        shapes = rng.sample(SHAPES, 2)
        if task == "two_objects":
            colors = [rng.choice(list(COLORS)) for _ in shapes]
        else:
            colors = rng.sample(list(COLORS), 2)
        specs = list(zip(shapes, colors))
    return specs, rng.choice(RELATIONS) if task == "position" else None


def held_out(meta: dict[str, Any]) -> bool:
    """Whether a scene's caption is one of the position and color_attr captions (42 of 288, 16
    of 72: a CRC-32 of the caption, the same everywhere) that generated shards never hold:
    examples/prompts/geneval_synthetic_held_out.jsonl scores text the model never saw."""
    return (meta["task"] in HELD_OUT_TASKS
            and zlib.crc32(caption_from_metadata(meta).encode()) % 5 == 0)


def relation_of(a: list[int], b: list[int]) -> str | None:
    """Where box a lies relative to box b ("left of", ...), by bbox centres; None if the
    horizontal and vertical offsets are too close to call."""
    dx = (a[0] + a[2]) - (b[0] + b[2])  # twice the centre offsets
    dy = (a[1] + a[3]) - (b[1] + b[3])
    if abs(abs(dx) - abs(dy)) < 4:
        return None
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _layout(rng: random.Random, n: int, size: int, relation: str | None) -> list[list[int]]:
    """Square boxes for n objects, one per cell of a small grid, so they never overlap.

    Side lengths are about a third to a half of the image (11-16 px at 32x32). For the
    position task the grid follows the relation and placement is redrawn until the relation
    is unambiguous from the box centres.
    """
    if n == 1:
        grid = (1, 1)
    elif n == 2:
        if relation is None:
            grid = rng.choice([(1, 2), (2, 1)])
        else:
            grid = (1, 2) if relation in ("left of", "right of") else (2, 1)
    else:
        grid = (2, 2)
    rows, cols = grid
    cell_h, cell_w = size // rows, size // cols
    side_lo = round(0.34 * size)
    side_hi = max(side_lo, min(round(0.5 * size), min(cell_h, cell_w) - 2))
    while True:
        if relation is None:
            cells = rng.sample(range(rows * cols), n)
        else:  # object 0 goes in the first (left/top) cell unless it is right of / below
            cells = [1, 0] if relation in ("right of", "below") else [0, 1]
        boxes = []
        for cell in cells:
            side = rng.randint(side_lo, side_hi)
            r, c = divmod(cell, cols)
            x0 = c * cell_w + rng.randint(1, max(1, cell_w - side - 1))
            y0 = r * cell_h + rng.randint(1, max(1, cell_h - side - 1))
            boxes.append([x0, y0, x0 + side, y0 + side])
        if relation is None or relation_of(boxes[0], boxes[1]) == relation:
            return boxes


def draw_scene(objects: list[dict[str, Any]], size: int) -> Image.Image:
    """Draw objects ({shape, color, bbox}, as in a scene's metadata) on a white background."""
    big = Image.new("RGB", (size * SUPERSAMPLE,) * 2, BACKGROUND)
    draw = ImageDraw.Draw(big)
    for obj in objects:
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in obj["bbox"])
        x1, y1 = x1 - 1, y1 - 1  # Pillow's boxes are inclusive
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:  # triangle, apex up
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return big.resize((size, size), Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def write_shard(path: str | os.PathLike, shard: int, samples_per_shard: int,
                image_size: int = 32, seed: int = 0) -> str:
    """Write shard number `shard` to `path`; its content depends only on (seed, shard).

    The file appears atomically (written under a temporary name, then renamed), so a reader
    never sees half a shard.
    """
    path = str(path)
    rng = random.Random(f"megatron_ecdit.synthetic/{seed}/{shard}")
    tmp = f"{path}.tmp{os.getpid()}"
    # A fixed mtime makes the tar byte-identical across runs; an integer one avoids a pax
    # header per member (tarfile writes one for a float mtime), almost halving read time.
    with wds.TarWriter(tmp, mtime=0) as sink:
        for index in range(samples_per_shard):
            image, caption, meta = render_scene(rng, image_size)
            key = f"{shard:05d}{index:04d}"
            record = dict(key=key, caption=caption, width=image.width, height=image.height,
                          status="success", **meta)
            sink.write({"__key__": key, "png": image, "txt": caption, "json": record})
    os.replace(tmp, path)
    return path


def write_synthetic_shards(out_dir: str | os.PathLike, num_shards: int, samples_per_shard: int,
                           image_size: int = 32, seed: int = 0) -> list[str]:
    """Write shards out_dir/000000.tar ... ; returns their paths."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return [write_shard(Path(out_dir) / f"{shard:06d}.tar", shard, samples_per_shard,
                        image_size, seed)
            for shard in range(num_shards)]


def write_missing_synthetic_shards(urls: str, samples_per_shard: int, image_size: int = 32,
                                   seed: int = 0) -> list[str]:
    """Write those shards named by a brace pattern ("data/x/{000000..000007}.tar") that do not
    exist yet; each file name's digits give its shard index. Returns the paths written."""
    written = []
    for url in wds.shardlists.expand_urls(urls):
        match = re.fullmatch(r"(\d+)\.tar", Path(url).name)
        if match is None:
            raise ValueError(f"synthetic shard names must look like 000123.tar, got {url!r}")
        if not Path(url).exists():
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            written.append(write_shard(url, int(match.group(1)), samples_per_shard,
                                       image_size, seed))
    return written
