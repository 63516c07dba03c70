"""Decoding one sample of a shard, and collating decoded samples into a batch.

A sample is what webdataset groups from a tar: {"__key__", "__url__", extension: bytes}. Two
layouts are read:

  raw           KEY.{jpg,jpeg,png,webp} + KEY.txt (img2dataset) -> `RawDecoder`:
                {"image": float32 (3, H, W) in [-1, 1], "caption": str, "key": str}
  preprocessed  KEY.safetensors holding "latent" (C, h, w) and "text" (n, D), the hidden states
                of the caption's n real tokens, + KEY.txt (tools/preprocess_shards.py)
                -> `PreprocessedDecoder`: {"latent", "text", "caption", "key"}

Decoded arrays are numpy, and batches are assembled in numpy and handed to torch once: torch's
multi-threaded fills would compete with training for the cores when there are no DataLoader
workers. A decoder raises `BadSample` for a sample it must skip. Tensors are stored as
safetensors (no pickle anywhere). Images get a resize of the shorter side and a centre crop,
nothing else: no aspect-ratio bucketing, no augmentation, no caption filtering.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

import numpy as np
import safetensors.numpy
import torch
from PIL import Image

from megatron_ecdit.data.bad_input import BadSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ENCODED = "safetensors"  # the member of a preprocessed sample holding "latent" and "text"


class Decoder(Protocol):
    """Turns a sample into an example (or raises BadSample), and examples into a batch."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]: ...

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]: ...


class RawDecoder:
    """Image + caption samples -> {"image", "caption", "key"}; batches of
    {"image": (B, 3, H, W) float32, "caption": list[str], "key": list[str]}."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        caption = read_caption(sample)
        return {"image": _decode_image(sample, self.image_size), "caption": caption,
                "key": sample["__key__"]}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": torch.from_numpy(np.stack([e["image"] for e in examples])),
                "caption": [e["caption"] for e in examples],
                "key": [e["key"] for e in examples]}


class PreprocessedDecoder:
    """Latent + text embedding samples, checked against the shapes training expects.

    Batches: {"latent": (B, C, h, w) float32, "text": (B, L, D) float32 zero-padded,
    "text_mask": (B, L) bool (True = real token, a prefix, as `TextEncoder.encode` returns),
    "caption", "key"}.
    """

    def __init__(self, latent_shape: tuple[int, int, int], text_shape: tuple[int, int]):
        self.latent_shape, self.text_shape = tuple(latent_shape), tuple(text_shape)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        caption = read_caption(sample)
        tensors = _read_tensors(sample)
        latent, text = tensors["latent"], tensors["text"]
        if latent.shape != self.latent_shape:
            raise BadSample("bad_latent", f"latent of shape {latent.shape}, expected "
                                          f"{self.latent_shape}")
        length, dim = self.text_shape
        if text.ndim != 2 or not 1 <= text.shape[0] <= length or text.shape[1] != dim:
            raise BadSample("bad_latent", f"text embedding of shape {text.shape}, expected "
                                          f"(1..{length}, {dim})")
        return {"latent": latent.astype(np.float32), "text": text.astype(np.float32),
                "caption": caption, "key": sample["__key__"]}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        length, dim = self.text_shape
        text = np.zeros((len(examples), length, dim), np.float32)  # (B, L, D)
        mask = np.zeros((len(examples), length), bool)  # (B, L)
        for i, e in enumerate(examples):
            n = e["text"].shape[0]
            text[i, :n] = e["text"]
            mask[i, :n] = True
        return {"latent": torch.from_numpy(np.stack([e["latent"] for e in examples])),
                "text": torch.from_numpy(text), "text_mask": torch.from_numpy(mask),
                "caption": [e["caption"] for e in examples],
                "key": [e["key"] for e in examples]}


def encode_tensors(latent: np.ndarray, text: np.ndarray) -> bytes:
    """The KEY.safetensors member of a preprocessed sample."""
    return safetensors.numpy.save({"latent": np.ascontiguousarray(latent),
                                   "text": np.ascontiguousarray(text)})


def read_caption(sample: dict[str, Any]) -> str:
    if "txt" not in sample:
        raise BadSample("missing_caption", "no .txt member")
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample("missing_caption", f"caption is not UTF-8 ({e})") from None
    if not caption:
        raise BadSample("empty_caption", "blank .txt member")
    return caption


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, then crop the centre size x size square."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _decode_image(sample: dict[str, Any], size: int) -> np.ndarray:
    ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if ext is None:
        raise BadSample("undecodable_image", "no image member")
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            image = resize_center_crop(image.convert("RGB"), size)
    except Exception as e:  # PIL raises several types for bad bytes
        raise BadSample("undecodable_image", f".{ext}: {type(e).__name__}: {e}") from None
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W)
    return pixels / 127.5 - 1.0


def _read_tensors(sample: dict[str, Any]) -> dict[str, np.ndarray]:
    if ENCODED not in sample:
        raise BadSample("bad_latent", f"no .{ENCODED} member")
    try:
        tensors = safetensors.numpy.load(sample[ENCODED])
    except Exception as e:  # a damaged header or payload
        raise BadSample("bad_latent", f".{ENCODED}: {type(e).__name__}: {e}") from None
    for name in ("latent", "text"):
        array = tensors.get(name)
        if array is None:
            raise BadSample("bad_latent", f"no {name!r} tensor in .{ENCODED}")
        if array.dtype.kind != "f" or not np.isfinite(array).all():
            raise BadSample("bad_latent", f"{name!r} is not finite floating point "
                                          f"({array.dtype})")
    return tensors
