"""Encode raw shards once: images -> VAE latents, captions -> text embeddings, as new shards.

Each input shard becomes one output shard of the same file name, holding per sample
KEY.safetensors with "latent" (C, h, w) and "text" (n, D), the hidden states of the caption's
n real tokens (training pads them to the encoder's max_length with a prefix mask, as
`TextEncoder.encode` does), and KEY.txt, the caption; other members (e.g. .json) are not
copied. Images are decoded, resized and centre-cropped exactly as training reads raw shards
(decode.RawDecoder), so training on the output equals encoding on the fly; bad input is
skipped and counted with the same kinds.

Shards are independent tasks for a pool of processes, each loading the frozen encoders once.
A shard is written to ``NAME.partial`` and renamed when complete, so an existing output is
always whole and is skipped when the tool runs again; a leftover ``.partial`` is rewritten. A
shard that cannot be read is left unwritten (to retry later); one that breaks off part-way is
written with the samples before the break.

Not done here: sharding the work across machines (give each machine its own brace list),
posterior sampling (the VAE's mean is stored) or augmentation.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import webdataset as wds

from megatron_ecdit.config import TextEncoderConfig, VAEConfig
from megatron_ecdit.data.bad_input import BadInputLog, zero_counts
from megatron_ecdit.data.decode import ENCODED, RawDecoder, encode_tensors
from megatron_ecdit.data.shards import decoded_groups, read_shard
from megatron_ecdit.encoders.text import TextEncoder
from megatron_ecdit.encoders.vae import Autoencoder, build_vae

Dtype = Literal["float32", "float16"]


@dataclass
class ShardReport:
    url: str
    output: str
    status: Literal["written", "skipped", "failed"]
    samples: int = 0  # samples written
    counts: dict[str, int] = field(default_factory=zero_counts)  # seen and skipped, per kind


@dataclass
class Encoders:
    text: TextEncoder
    vae: Autoencoder


def build_encoders(text_cfg: TextEncoderConfig, vae_cfg: VAEConfig) -> Encoders:
    return Encoders(TextEncoder(text_cfg.path, text_cfg.tokenizer_path, text_cfg.max_length,
                                text_cfg.cache_size),
                    build_vae(vae_cfg.path))


def output_name(url: str) -> str:
    """The shard's file name: the last ``*.tar`` name in the URL (also in a pipe: command)."""
    names = re.findall(r"([^\s/'\"]+\.tar)(?![^\s/'\"])", url)
    if not names:
        raise ValueError(f"cannot name the output of {url!r}: no *.tar file name in it")
    return names[-1]


def preprocess_shards(urls: str, out_dir: str | os.PathLike, *, text_cfg: TextEncoderConfig,
                      vae_cfg: VAEConfig, image_size: int, workers: int = 0,
                      batch_size: int = 64, dtype: Dtype = "float32") -> list[ShardReport]:
    """Encode every shard of `urls` that has no output in `out_dir` yet.

    workers: processes in the pool; 0 = in this process. Returns one report per input shard.
    """
    inputs = wds.shardlists.expand_urls(urls)
    outputs = [str(Path(out_dir) / output_name(url)) for url in inputs]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"two shards of {urls} have the same file name; outputs would collide")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    todo = [(url, out) for url, out in zip(inputs, outputs) if not Path(out).exists()]
    done = {out: ShardReport(url, out, "skipped") for url, out in zip(inputs, outputs)}
    args = (image_size, batch_size, dtype)
    if workers == 0:
        encoders = build_encoders(text_cfg, vae_cfg)
        reports = [preprocess_shard(url, out, encoders, *args) for url, out in todo]
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_worker,
                                 initargs=(text_cfg, vae_cfg, threads)) as pool:
            reports = list(pool.map(_preprocess_in_worker, todo, [args] * len(todo)))
    done.update((r.output, r) for r in reports)
    return [done[out] for out in outputs]


def preprocess_shard(url: str, output: str, encoders: Encoders, image_size: int,
                     batch_size: int = 64, dtype: Dtype = "float32") -> ShardReport:
    """Encode one shard into `output` (written as ``output + ".partial"``, then renamed)."""
    log = BadInputLog(max_fraction=1.0, check_after=1)  # count and log; never stop
    decoder = RawDecoder(image_size)
    partial = output + ".partial"
    written = 0
    # An integer mtime: a float one makes tarfile add a pax header to every member.
    with wds.TarWriter(partial, mtime=int(time.time())) as sink:
        for examples in decoded_groups(read_shard(url), decoder, log, batch_size):
            if not examples:
                continue
            batch = decoder.collate(examples)
            latents = encoders.vae.encode(batch["image"]).numpy()  # (B, C, h, w)
            text, mask = encoders.text.encode(batch["caption"])  # (B, L, D), (B, L)
            for i, (key, caption) in enumerate(zip(batch["key"], batch["caption"])):
                tokens = text[i][mask[i]].numpy()  # (n, D): the real tokens, a prefix
                sink.write({"__key__": key, "txt": caption,
                            ENCODED: encode_tensors(latents[i].astype(dtype),
                                                    tokens.astype(dtype))})
            written += len(examples)
    if log.counts["unreadable_shard"]:
        os.remove(partial)
        return ShardReport(url, output, "failed", 0, log.counts)
    os.replace(partial, output)
    return ShardReport(url, output, "written", written, log.counts)


_worker_encoders: Optional[Encoders] = None  # one per pool process


def _start_worker(text_cfg: TextEncoderConfig, vae_cfg: VAEConfig, threads: int) -> None:
    global _worker_encoders
    torch.set_num_threads(threads)
    _worker_encoders = build_encoders(text_cfg, vae_cfg)


def _preprocess_in_worker(task: tuple[str, str], args: tuple[int, int, Dtype]) -> ShardReport:
    return preprocess_shard(*task, _worker_encoders, *args)


def summarize(reports: list[ShardReport]) -> dict[str, Any]:
    """Totals over shards: shards per status, samples written, items seen and skipped."""
    counts = zero_counts()
    for r in reports:
        for k, v in r.counts.items():
            counts[k] += v
    statuses = {s: sum(r.status == s for r in reports) for s in ("written", "skipped", "failed")}
    return {**statuses, "samples": sum(r.samples for r in reports), "counts": counts}
