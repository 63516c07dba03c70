"""A GenEval-style scorer for the synthetic shape domain (data/synthetic.py).

GenEval (Ghosh et al., 2023) scores a text-to-image model by detecting the objects in its images
and checking each prompt's metadata: which classes must appear (`include`, with a count, and
optionally a colour or a position relative to an earlier include), which must not (`exclude`).
Here the classes are the synthetic shapes and the detector is exact rather than learned:

- detection: every pixel is explained as a blend of the white background and one palette
  colour (antialiasing makes exactly such blends), it belongs to the palette colour whose blend
  line passes nearest, and to the foreground when more than half of it is that colour; the
  connected regions of one colour are the objects (scikit-image's `label`), except specks:
  regions smaller than `MIN_AREA_FRACTION` of the image or less solid than `MIN_SOLIDITY`;
- shape: the shapes are axis-aligned, so the fraction of its bounding box a region fills
  (regionprops' `extent`) tells them apart: a square fills 1, a circle pi/4, the apex-up
  triangle 1/2. Measured on 2,700 rendered objects at 32x32 (sides 11-16 px) the extents are
  0.50-0.55, 0.78-0.81 and 1.00, so the nearest ideal extent is always right (at 16, 24 and 64
  px too: ground-truth renders score 1.0 on every task at each size);
- scoring: `score` is GenEval's rule for its metadata (evaluate_images.py), with objects ordered
  by area where GenEval orders them by detector confidence, and `relative_position` is GenEval's
  (bounding-box centres, a dead zone of 0.1 of the two sizes).

The result is per-task accuracy and their mean, as GenEval reports. This module does not
generate images (tools/sample_ecdit.py does) and knows nothing of models or training.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image
from skimage.measure import label, regionprops

from megatron_ecdit.data.synthetic import (
    BACKGROUND,
    COLORS,
    HELD_OUT_TASKS,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    TASKS,
    caption_from_metadata,
    held_out,
)

# A region is an object when it is large and solid enough. The smallest rendered object covers
# 0.060 of a 32x32 image (an 11 px triangle, 61 px) and 0.051 of a 16x16 one, with solidity
# >= 0.86 at 32x32 and >= 0.77 at 16x16; same-colour specks in uniform noise stay below both
# (4 regions of >= 0.04 with solidity >= 0.75 in 300 noise images at 16x16, none at 32x32).
MIN_AREA_FRACTION = 0.04
MIN_SOLIDITY = 0.75
SHAPE_EXTENTS = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
POSITION_THRESHOLD = 0.1  # GenEval's


class EvaluationError(ValueError):
    """Input the scorer cannot use (a missing image, metadata that does not parse)."""


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    color: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive (as synthetic.py)
    area: int


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def color_map(image: Any) -> np.ndarray:
    """(H, W) palette index + 1 of each pixel's colour, 0 for background: each pixel is read
    as a blend of the white background and one palette colour (antialiasing makes exactly such
    blends) and counts as that colour when it is more than half of it."""
    pixels = np.asarray(image, dtype=np.float64)[..., :3]  # (H, W, 3)
    white = np.asarray(BACKGROUND, dtype=np.float64)
    ink = np.stack([white - np.asarray(c, dtype=np.float64) for c in COLORS.values()])  # (K, 3)
    # A pixel is white - alpha * ink[k]: alpha per colour by least squares, then the colour
    # whose line fits best.
    d = white - pixels  # (H, W, 3)
    alpha = d @ ink.T / (ink**2).sum(-1)  # (H, W, K)
    residual = np.linalg.norm(d[..., None, :] - alpha[..., None] * ink, axis=-1)  # (H, W, K)
    k = residual.argmin(-1)  # (H, W)
    coverage = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
    return np.where(coverage > 0.5, k + 1, 0)


def detect_objects(image: Any) -> list[DetectedObject]:
    """The shapes in an RGB image (PIL image or (H, W, 3) uint8 array), largest first."""
    colors = color_map(image)
    min_area = MIN_AREA_FRACTION * colors.size
    names = list(COLORS)
    objects = []
    for region in regionprops(label(colors, background=0, connectivity=1)):
        if region.area < min_area or region.solidity < MIN_SOLIDITY:
            continue
        y0, x0, y1, x1 = region.bbox
        shape = min(SHAPE_EXTENTS, key=lambda s: abs(SHAPE_EXTENTS[s] - region.extent))
        color = names[colors[tuple(region.coords[0])] - 1]
        objects.append(DetectedObject(shape, color, (x0, y0, x1, y1), int(region.area)))
    return sorted(objects, key=lambda o: -o.area)


# --------------------------------------------------------------------------------------------
# GenEval's rules
# --------------------------------------------------------------------------------------------


def relative_position(a: DetectedObject, b: DetectedObject) -> set[str]:
    """Where a lies relative to b, as GenEval decides it: the centre offset, less a dead zone of
    POSITION_THRESHOLD times the two sizes, must point mostly along an axis."""
    boxes = np.array([a.bbox, b.bbox], dtype=np.float64).reshape(2, 2, 2)  # (obj, corner, xy)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = boxes[:, 1] - boxes[:, 0]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (size_a + size_b), 0)
    if np.all(revised < 1e-3):
        return set()
    dx, dy = revised * np.sign(offset) / np.linalg.norm(offset)
    return {rel for rel, hit in (("left of", dx < -0.5), ("right of", dx > 0.5),
                                 ("above", dy < -0.5), ("below", dy > 0.5)) if hit}


def score(objects: list[DetectedObject], metadata: dict[str, Any]) -> tuple[bool, str]:
    """GenEval's verdict on one image: (correct, the reasons it is not)."""
    by_shape: dict[str, list[DetectedObject]] = {}
    for obj in objects:
        by_shape.setdefault(obj.shape, []).append(obj)
    reasons = []
    matched_groups: list[list[DetectedObject] | None] = []
    for req in metadata.get("include", []):
        shape, count = req["class"], req["count"]
        found = by_shape.get(shape, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {shape}>={count}, found {len(found)}")
        elif "color" in req and [o.color for o in found].count(req["color"]) < count:
            matched = False
            reasons.append(f"expected {req['color']} {shape}>={count}, found "
                           f"{[o.color for o in found]}")
        elif "position" in req:
            relation, target = req["position"]
            if matched_groups[target] is None:
                matched = False
                reasons.append(f"no target for {shape} to be {relation}")
            elif not all(relation in relative_position(o, t)
                         for o in found for t in matched_groups[target]):
                matched = False
                reasons.append(f"expected {shape} {relation} target")
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(by_shape.get(req["class"], [])) >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, "
                           f"found {len(by_shape[req['class']])}")
    return not reasons, "; ".join(reasons)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped); EvaluationError names the line
    that does not parse."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise EvaluationError(f"cannot read {path}: {err.strerror}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EvaluationError(f"{path}:{number} is not JSON: {err}") from None
            if not isinstance(records[-1], dict):
                raise EvaluationError(f"{path}:{number} is not a JSON object")
    return records


def evaluate_folder(folder: str | Path, metadata: str | Path | None = None) -> dict[str, Any]:
    """Score the generated images of a folder: `metadata` (default FOLDER/metadata.jsonl) has
    one GenEval record per image with its file name under `image`, as tools/sample_ecdit.py
    writes it. Returns summarize's dict plus `images`, one verdict per record."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{folder} is not a folder")
    path = Path(metadata) if metadata is not None else folder / "metadata.jsonl"
    verdicts = []
    for number, record in enumerate(read_jsonl(path), 1):
        missing = [k for k in ("image", "tag", "include") if k not in record]
        if missing:
            raise EvaluationError(f"{path}:{number} lacks {', '.join(missing)}")
        try:
            with Image.open(folder / record["image"]) as image:
                objects = detect_objects(image.convert("RGB"))
        except OSError as err:
            raise EvaluationError(f"{path}:{number}: cannot read image "
                                  f"{folder / record['image']}: {err}") from None
        correct, reason = score(objects, record)
        verdicts.append(dict(image=record["image"], tag=record["tag"], prompt=record.get("prompt"),
                             correct=correct, reason=reason))
    if not verdicts:
        raise EvaluationError(f"{path} has no records")
    return {**summarize((v["tag"], v["correct"]) for v in verdicts), "images": verdicts}


def summarize(results: Iterable[tuple[str, bool]]) -> dict[str, Any]:
    """Per-task accuracy over (task, correct) pairs, and their mean ("overall"), as GenEval."""
    per_task: dict[str, list[bool]] = {}
    for task, correct in results:
        per_task.setdefault(task, []).append(correct)
    accuracy = {task: float(np.mean(per_task[task])) for task in TASKS if task in per_task}
    return {"tasks": accuracy, "counts": {t: len(per_task[t]) for t in accuracy},
            "overall": float(np.mean(list(accuracy.values()))) if accuracy else 0.0}


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def geneval_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """GenEval metadata (tag, prompt, include, exclude) for a synthetic scene's metadata
    (task, objects, relation). Colours are required wherever the caption states them."""
    task, objs = meta["task"], meta["objects"]

    def req(obj: dict[str, Any], count: int = 1) -> dict[str, Any]:
        r: dict[str, Any] = {"class": obj["shape"], "count": count}
        if task != "two_objects" and task != "single_object":
            r["color"] = obj["color"]
        return r

    out: dict[str, Any] = {"tag": task, "prompt": caption_from_metadata(meta)}
    if task == "counting":
        out["include"] = [req(objs[0], len(objs))]
        out["exclude"] = [{"class": objs[0]["shape"], "count": len(objs) + 1}]
    elif task == "position":  # the subject (object 0) is placed relative to the target
        out["include"] = [req(objs[1]), {**req(objs[0]), "position": [meta["relation"], 0]}]
    else:
        out["include"] = [req(o) for o in objs]
    return out


def all_scenes(task: str) -> list[dict[str, Any]]:
    """Every distinct caption's scene metadata (no boxes) of a task, in a fixed order: the
    whole prompt vocabulary the synthetic data can produce."""
    colors = list(COLORS)
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if task == "single_object":
        return [dict(task=task, objects=[dict(shape=s, color=None)]) for s in SHAPES]
    if task == "colors":
        return [dict(task=task, objects=[dict(shape=s, color=c)]) for s in SHAPES for c in colors]
    if task == "counting":
        return [dict(task=task, objects=[dict(shape=s, color=c)] * n)
                for n in NUMBER_WORDS for s in SHAPES for c in colors]
    if task == "two_objects":
        return [dict(task=task, objects=[dict(shape=a, color=None), dict(shape=b, color=None)])
                for a, b in pairs]
    color_pairs = [(a, b) for a in colors for b in colors if a != b]
    scenes = [dict(task=task, objects=[dict(shape=a, color=ca), dict(shape=b, color=cb)])
              for a, b in pairs for ca, cb in color_pairs]
    if task == "position":
        return [dict(s, relation=r) for s in scenes for r in RELATIONS]
    if task == "color_attr":
        return scenes
    raise ValueError(f"unknown task {task!r}")


def evaluation_prompts(per_task: int = 16, seed: int = 0,
                       unseen: bool = False) -> list[dict[str, Any]]:
    """An evaluation set: `per_task` GenEval metadata records for each task, distinct prompts
    drawn without replacement where the task has that many, else every prompt in turn.

    The standard set (examples/prompts/geneval_synthetic.jsonl) draws from the captions the
    synthetic data draws: 359 of the 417 (3 single_object, 6 two_objects, 36 counting,
    12 colors, and the 246 position and 56 color_attr captions not held out), so the demo's
    8,000 training scenes contain essentially every one; what is new to the model are the
    images, scored against the prompt's rules rather than a training layout. `unseen` draws
    from the 58 held-out captions instead (synthetic.held_out: 42 position, 16 color_attr;
    examples/prompts/geneval_synthetic_held_out.jsonl): text the model never trained on.
    """
    rng = random.Random(f"megatron_ecdit.geneval/{'held_out/' if unseen else ''}{seed}")
    records = []
    for task in HELD_OUT_TASKS if unseen else TASKS:
        scenes = [s for s in all_scenes(task) if held_out(s) == unseen]
        if len(scenes) >= per_task:
            chosen = rng.sample(scenes, per_task)
        else:
            chosen = [scenes[i % len(scenes)] for i in range(per_task)]
        records += [geneval_metadata(s) for s in chosen]
    return records
