"""Streaming image-text shards with webdataset, per data-parallel rank, with an exact resume.

`BatchStream` is what training reads: batches for one data-parallel rank, with a position that
goes into checkpoints. Shards are tar files in img2dataset's layout (raw: image + caption) or
written by tools/preprocess_shards.py (latents + text embeddings; see decode.py), named by
local paths, brace lists (``data/{00000..09999}.tar``) or webdataset ``pipe:`` commands
(``pipe:curl -s https://host/{000..099}.tar``); ``::`` joins several lists.

Splitting. The caller passes the data-parallel rank and size, never the global rank: the
tensor- and pipeline-parallel peers of a DP rank must see the same samples (webdataset's
split_by_node reads the global RANK and would split them). Each rank runs one stream per
DataLoader worker (one stream without workers); stream `s = worker * dp_size + dp_rank` is a
pure function of (urls, seed, dp_rank, dp_size, worker, num_workers):
  resampled (the training default): webdataset's ResampledShards draws shards with replacement
      from the stream's own seed, endlessly; ranks see independent streams, not disjoint data.
  epochs (resampled=False): each epoch the shard list is shuffled from (seed, epoch)
      (SimpleShardList) and stream s takes every (dp_size * workers)-th shard from the s-th, so
      every sample reaches exactly one rank per epoch; the epochs follow each other endlessly.
Samples then pass webdataset's buffer shuffle, its rng seeded from (seed, s, epoch). Every
worker yields whole batches, so every rank gets `batch_size` samples at every step.

Bad input (bad_input.py) never stops the stream: `read_shard` turns a shard failure into one
`BadInput` item that goes through the shuffle buffer like a sample, and a decoder's `BadSample`
becomes one too; each is logged and counted when it is drawn. (webdataset's
``tarfile_to_samples(handler=...)`` calls its handler twice for a truncated shard and passes its
partial last sample downstream, so its counts would be wrong.) The counts (with `seen`, the items
drawn) ride along with every batch; DataError stops the run when the skipped fraction exceeds
``data.max_bad_fraction`` after ``data.bad_check_after`` items, per worker and per rank.

Exact resume. A batch carries its worker's counts, whose `seen` is that worker's position in
its deterministic stream. `BatchStream.state_dict` keeps, for the batches returned (not those
prefetched), each worker's latest counts and the worker whose batch comes next. On
`load_state_dict` every worker restarts its stream and drops the first `seen` items without
decoding them; since torch's DataLoader always starts its round-robin at worker 0, physical
worker p runs logical worker (p + next) % num_workers. A resume needs the same urls, seed,
shuffle buffer, mode, DP rank and size and number of workers (`load_state_dict` says which
differ); the batch size may change. The cost of the fast-forward: each worker re-reads and
un-tars every byte it had read (the skipped samples and the shuffle buffer's read-ahead), with
no image decoding; see benchmarks/RESULTS.md for the rate.

Not done here: aspect-ratio bucketing, caption filtering, augmentation, retries of failing URLs.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import tarfile
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Iterator, Optional, Union

import torch
import webdataset as wds

from megatron_ecdit.config import DataConfig
from megatron_ecdit.data.bad_input import (
    BAD_KINDS,
    BadInput,
    BadInputLog,
    BadSample,
    DataError,
    check_bad_fraction,
    describe_counts,
    zero_counts,
)
from megatron_ecdit.data.decode import ENCODED, Decoder, PreprocessedDecoder, RawDecoder

Item = Union[dict[str, Any], BadInput]  # what a stream draws: a sample or a skipped input

__all__ = ["BatchStream", "DataError", "build_dataloader", "build_image_text_dataset",
           "describe_counts", "detect_format", "read_shard"]


@dataclass(frozen=True)
class StreamSpec:
    """What decides the order of one data-parallel rank's items."""

    urls: str
    seed: int
    shuffle_buffer: int
    resampled: bool
    dp_rank: int
    dp_size: int

    def __post_init__(self):
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank={self.dp_rank} must be in [0, dp_size={self.dp_size})")


class BatchStream:
    """Iterator of batches for one data-parallel rank, with a checkpointable position.

    Batches of raw shards: {"image": (B, 3, H, W) float32 in [-1, 1], "caption": list[str],
    "key": list[str]}; of preprocessed shards: {"latent": (B, C, h, w) float32, "text": (B, L, D)
    float32, "text_mask": (B, L) bool, "caption", "key"}.

    Args:
        data_cfg: the ``data`` section (urls, format, seed, shuffle buffer, workers, ...).
        batch_size: samples per batch.
        dp_rank, dp_size: this rank's data-parallel rank and the data-parallel size.
        latent_shape: (C, h, w) of the latents, and text_shape: (L, D) of the text embeddings,
            that training expects; needed for preprocessed shards (a sample of another shape is
            skipped as bad_latent).
        epochs: None = endless. With resampled=False, stop after this many epochs; the last
            batch of each worker may then be short.
    """

    def __init__(self, data_cfg: DataConfig, batch_size: int, *, dp_rank: int, dp_size: int,
                 latent_shape: Optional[tuple[int, int, int]] = None,
                 text_shape: Optional[tuple[int, int]] = None, epochs: Optional[int] = None):
        data_cfg.validate()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg, self.batch_size, self.epochs = data_cfg, batch_size, epochs
        self.spec = StreamSpec(data_cfg.urls, data_cfg.seed, data_cfg.shuffle_buffer,
                               data_cfg.resampled, dp_rank, dp_size)
        self.num_streams = max(1, data_cfg.num_workers)  # logical workers
        if data_cfg.resampled and epochs is not None:
            raise ValueError("epochs needs data.resampled=false (resampled streams are endless)")
        if not data_cfg.resampled:
            shards = len(wds.shardlists.expand_urls(data_cfg.urls))
            if shards < dp_size * self.num_streams:
                raise ValueError(f"data.resampled=false needs at least dp_size x workers = "
                                 f"{dp_size} x {self.num_streams} shards, got {shards} in "
                                 f"{data_cfg.urls}")
        self.format = (detect_format(data_cfg.urls) if data_cfg.format == "auto"
                       else data_cfg.format)
        if self.format == "raw":
            self.decoder = RawDecoder(data_cfg.image_size)
        elif latent_shape is None or text_shape is None:
            raise ValueError(f"{data_cfg.urls} holds preprocessed shards: pass latent_shape "
                             f"(C, h, w) and text_shape (L, D) of the frozen encoders")
        else:
            self.decoder = PreprocessedDecoder(latent_shape, text_shape)
        self._counts = [zero_counts() for _ in range(self.num_streams)]
        self._next_worker = 0
        self._batches = 0
        self._loader: Optional[Iterator[dict[str, Any]]] = None

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._loader is None:
            self._loader = iter(self._build_loader())
        while True:
            batch = next(self._loader)
            worker = batch.pop("__worker__")
            self._counts[worker] = batch.pop("__counts__")
            self._next_worker = (worker + 1) % self.num_streams
            check_bad_fraction(self.bad_counts(), self.cfg.max_bad_fraction,
                               self.cfg.bad_check_after)
            if batch["key"]:  # an empty batch only brings a finished worker's last counts
                self._batches += 1
                return batch

    def bad_counts(self) -> dict[str, int]:
        """Items drawn ("seen") and skipped, per kind, over the batches returned (with the
        items drawn before them that were skipped)."""
        return {k: sum(c[k] for c in self._counts) for k in ("seen", *BAD_KINDS)}

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches returned so far."""
        return {"stream": self._identity(), "batches": self._batches,
                "next_worker": self._next_worker, "workers": [dict(c) for c in self._counts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; call before the first batch."""
        if self._loader is not None:
            raise RuntimeError("BatchStream.load_state_dict must be called before the first "
                               "batch is drawn")
        saved, now = state["stream"], self._identity()
        differ = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items()
                  if saved.get(k) != v]
        if differ:
            raise ValueError("cannot continue the data stream of the checkpoint exactly; it "
                             "differs in " + "; ".join(differ))
        self._counts = [{**zero_counts(), **counts} for counts in state["workers"]]
        self._next_worker = state["next_worker"]
        self._batches = state["batches"]

    def _identity(self) -> dict[str, Any]:
        s = self.spec
        return {"urls": s.urls, "format": self.format, "seed": s.seed,
                "shuffle_buffer": s.shuffle_buffer, "resampled": s.resampled,
                "dp_rank": s.dp_rank, "dp_size": s.dp_size, "num_workers": self.cfg.num_workers}

    def _build_loader(self) -> torch.utils.data.DataLoader:
        dataset = _WorkerBatches(self.spec, self.decoder, self.batch_size, self.num_streams,
                                 self.epochs, (self.cfg.max_bad_fraction,
                                               self.cfg.bad_check_after),
                                 [dict(c) for c in self._counts], self._next_worker)
        # batch_size=None: workers yield whole batches; the DataLoader takes them in turn.
        return torch.utils.data.DataLoader(dataset, batch_size=None,
                                           num_workers=self.cfg.num_workers)


def detect_format(urls: str, max_shards: int = 8) -> str:
    """The format of the first sample of the first readable shard: "preprocessed" if it has
    encoded tensors, else "raw". Raises DataError if none of the first `max_shards` shards
    gives a sample."""
    for url in wds.shardlists.expand_urls(urls)[:max_shards]:
        with contextlib.closing(read_shard(url)) as items:
            first = next(items)
        if not isinstance(first, BadInput):
            return "preprocessed" if ENCODED in first else "raw"
    raise DataError(f"cannot tell the shard format: none of the first {max_shards} shards of "
                    f"{urls} gave a sample; check the urls or set data.format")


def read_shard(url: str) -> Iterator[Item]:
    """The samples of one tar shard, and one BadInput if the shard fails.

    Samples are webdataset's groups of members: {"__key__", "__url__", extension: bytes}. A
    shard that cannot be opened, fails with an OSError (e.g. a ``pipe:`` command's exit status)
    or has no member counts as one unreadable_shard; one that breaks off after some members
    (truncated, damaged member or header, duplicate name) as one corrupt_member. (A damaged
    header in the last 10 KiB of a shard, or a cut at a member boundary, looks like a normal
    end to tarfile and goes unnoticed.) Each sample is held back
    until the next one is complete, so the sample being read when a shard breaks off (maybe
    incomplete) is dropped with the rest of the shard.
    """
    errors: list[Exception] = []
    members = 0

    def tar_members(stream) -> Iterator[dict[str, Any]]:
        nonlocal members
        try:
            for member in wds.tariterators.tar_file_iterator(stream):
                members += 1
                member["__url__"] = url
                yield member
            # tarfile ends an archive quietly at a damaged member header; only zero padding
            # may follow a real end (what tarfile has buffered is not checked).
            while chunk := stream.read(1 << 20):
                if chunk.strip(b"\0"):
                    raise tarfile.ReadError("data after the end of the archive (a damaged "
                                            "member header)")
        except Exception as e:  # the rest of the shard is lost
            errors.append(e)

    try:
        stream = wds.gopen(url)
    except Exception as e:
        yield BadInput("unreadable_shard", url, None, _reason(e))
        return
    held = None
    try:
        for sample in wds.tariterators.group_by_keys(tar_members(stream)):
            if held is not None:
                yield held
            held = sample
    except Exception as e:  # raised by group_by_keys, e.g. a duplicate member name
        errors.append(e)
    finally:
        try:
            stream.close()  # a pipe: command reports its exit status here
        except Exception as e:
            errors.append(e)
    if errors:
        unreadable = members == 0 or isinstance(errors[0], OSError)
        yield BadInput("unreadable_shard" if unreadable else "corrupt_member", url,
                       held["__key__"] if held else None, _reason(errors[0]))
    elif held is None:
        yield BadInput("unreadable_shard", url, None, "no sample in the shard")
    else:
        yield held


def iter_items(spec: StreamSpec, worker: int, num_workers: int,
               epochs: Optional[int] = None) -> Iterator[Item]:
    """The shuffled, undecoded items of stream (spec.dp_rank, worker) of `num_workers`.

    epochs: None = endless; otherwise (resampled=False only) this many epochs.
    """
    stream = worker * spec.dp_size + spec.dp_rank
    if spec.resampled:
        if epochs is not None:
            raise ValueError("resampled streams are endless; epochs must be None")
        shards = wds.ResampledShards(spec.urls, seed=spec.seed, deterministic=True,
                                     worker_seed=lambda: stream)
        yield from _shuffled(_read_shards(shards), spec, stream, epoch=0)
        return
    for epoch in itertools.count() if epochs is None else range(epochs):
        # The same seeded shard order on every rank, then each stream takes its own slice.
        shards = wds.SimpleShardList(spec.urls, seed=f"{spec.seed}/{epoch}")
        mine = islice(shards, stream, None, spec.dp_size * num_workers)
        yield from _shuffled(_read_shards(mine), spec, stream, epoch)


def decode_item(item: Item, decoder: Decoder, log: BadInputLog) -> Optional[dict[str, Any]]:
    """Count the item as seen; decode it, or log and count it as skipped (None)."""
    log.saw()
    example = None
    if isinstance(item, BadInput):
        log.skip(item)
    else:
        try:
            example = decoder(item)
        except BadSample as e:
            log.skip(BadInput(e.kind, item["__url__"], item["__key__"], e.reason))
    log.check()
    return example


def decoded_groups(items: Iterable[Item], decoder: Decoder, log: BadInputLog,
                   size: int) -> Iterator[list[dict[str, Any]]]:
    """Decoded examples in lists of `size`, then the remainder (possibly empty)."""
    group = []
    for item in items:
        example = decode_item(item, decoder, log)
        if example is not None:
            group.append(example)
            if len(group) == size:
                yield group
                group = []
    yield group


# --------------------------------------------------------------------------------------------
# Per-sample dataset (no checkpointable position), for tools and simple readers
# --------------------------------------------------------------------------------------------


def build_image_text_dataset(urls: str, image_size: int, *, seed: int, shuffle_buffer: int,
                             dp_rank: int = 0, dp_size: int = 1, resampled: bool = True,
                             max_bad_fraction: float = 0.01,
                             bad_check_after: int = 100) -> torch.utils.data.IterableDataset:
    """An IterableDataset of raw {"image", "caption", "key"} read from the shards `urls`,
    split and shuffled as `BatchStream` does; resampled=False is a single epoch.

    shuffle_buffer <= 1 disables the sample shuffle (shard order is still seeded).
    """
    return _Samples(StreamSpec(urls, seed, shuffle_buffer, resampled, dp_rank, dp_size),
                    RawDecoder(image_size), (max_bad_fraction, bad_check_after))


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


class _WorkerBatches(torch.utils.data.IterableDataset):
    """Each DataLoader worker's batches, tagged with its logical worker and counts."""

    def __init__(self, spec: StreamSpec, decoder: Decoder, batch_size: int, num_streams: int,
                 epochs: Optional[int], limits: tuple[float, int], resume: list[dict[str, int]],
                 first_worker: int):
        self.spec, self.decoder, self.batch_size = spec, decoder, batch_size
        self.num_streams, self.epochs, self.limits = num_streams, epochs, limits
        self.resume, self.first_worker = resume, first_worker

    def __iter__(self) -> Iterator[dict[str, Any]]:
        physical, _ = _worker_info()
        worker = (physical + self.first_worker) % self.num_streams
        items = iter_items(self.spec, worker, self.num_streams, self.epochs)
        return _batches(items, self.decoder, self.batch_size, BadInputLog(*self.limits),
                        worker, self.resume[worker])


def _batches(items: Iterator[Item], decoder: Decoder, batch_size: int, log: BadInputLog,
             worker: int, resume: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Whole batches; a finite stream ends with its remainder, possibly empty, which carries
    the final counts."""
    for _ in islice(items, resume["seen"]):  # fast-forward: undecoded, unlogged
        pass
    log.counts = dict(resume)
    for examples in decoded_groups(items, decoder, log, batch_size):
        yield _tagged(decoder.collate(examples) if examples else {"key": []}, worker, log)


def _tagged(batch: dict[str, Any], worker: int, log: BadInputLog) -> dict[str, Any]:
    """The batch with what BatchStream needs for its position (removed before returning it)."""
    return {**batch, "__worker__": worker, "__counts__": dict(log.counts)}


class _Samples(torch.utils.data.IterableDataset):
    def __init__(self, spec: StreamSpec, decoder: Decoder, limits: tuple[float, int]):
        self.spec, self.decoder, self.limits = spec, decoder, limits

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker_info()
        log = BadInputLog(*self.limits)
        items = iter_items(self.spec, worker, num_workers, None if self.spec.resampled else 1)
        for item in items:
            example = decode_item(item, self.decoder, log)
            if example is not None:
                yield {**example, "image": torch.from_numpy(example["image"])}


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _read_shards(shards: Iterable[dict[str, str]]) -> Iterator[Item]:
    for shard in shards:
        yield from read_shard(shard["url"])


def _shuffled(items: Iterator[Item], spec: StreamSpec, stream: int, epoch: int) -> Iterator[Item]:
    if spec.shuffle_buffer <= 1:
        return items
    rng = random.Random(f"shuffle/{spec.seed}/{stream}/{epoch}")
    return wds.filters.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=rng)(items)


def _reason(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 300 else text[:297] + "..."
