"""An exported weights folder, in the sharded safetensors layout diffusers writes:

    config.json                                            (written by the caller)
    diffusion_pytorch_model-00001-of-00003.safetensors     shards of at most max_shard_size
    ...
    diffusion_pytorch_model.safetensors.index.json         {"metadata": {"total_size": N},
                                                            "weight_map": {name: shard file}}
A model that fits one shard has `diffusion_pytorch_model.safetensors` and no index, as diffusers
writes it. An earlier export's single `model.safetensors` reads as well.

`write_shards` plans the shards from names, shapes and dtypes alone (huggingface_hub's splitter),
then fills one shard at a time from an iterator the caller hands over tensor by tensor, each
cast to the export dtype as it arrives: what is in memory is the shard being filled and the
caller's group being converted, never the model. `staged` writes a folder under a temporary
name and renames it when it is complete; an interrupted one keeps a marker, so it is never
mistaken for a finished export. `WeightsFolder` opens the shards with `safe_open` (memory-mapped)
and reads a tensor, or only a slice of it, in its stored dtype.

What it deliberately does not do: know the model. Names, shapes and the meaning of the tensors
are the caller's (`checkpoint/consolidated.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from megatron_ecdit.checkpoint.distributed import CheckpointError

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
LEGACY_WEIGHTS = "model.safetensors"  # an earlier export's single file
DEFAULT_MAX_SHARD_SIZE = "10GB"  # diffusers' default; the Hub refuses files over 50 GB
INCOMPLETE = ".incomplete"  # in a folder being written; removed just before the rename

# safetensors' dtype names (safe_open's get_dtype) and torch's
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class ExportError(CheckpointError):
    """An exported folder that is missing, half written, truncated or inconsistent."""


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as it is (to be) stored: its full shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged(out: str | os.PathLike) -> Iterator[Path]:
    """A folder to write into, renamed to `out` when the block completes.

    It is `.{name}.partial` beside `out`, holding the INCOMPLETE marker until the end. An
    existing `out` is replaced only once the new folder is complete; on an error the partial
    folder is removed and the error goes on (nothing half written stays behind, and `out` is as
    it was). A process killed meanwhile leaves the marked partial folder, which readers refuse.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file() \
            and not (out / "model_index.json").is_file():
        raise ExportError(f"{out} is a folder that holds something other than an export; "
                          "choose another output folder")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / INCOMPLETE).write_text("an export is being written here; if it was interrupted, "
                                  "export again\n")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / INCOMPLETE).unlink()
    old = out.parent / f".{out.name}.old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def plan_shards(specs: dict[str, TensorSpec], max_shard_size: int | str):
    """huggingface_hub's split of `specs` into shards of at most `max_shard_size` bytes (a
    tensor larger than that gets a shard of its own), named as diffusers names them."""
    try:
        return split_state_dict_into_shards_factory(
            specs, get_storage_size=lambda spec: spec.nbytes, filename_pattern=PATTERN,
            max_shard_size=max_shard_size)
    except ValueError as err:
        raise ExportError(f"max shard size {max_shard_size!r}: {err}") from None


def write_shards(folder: Path, specs: dict[str, TensorSpec],
                 fetch: Callable[[list[str]], Iterable[tuple[str, torch.Tensor]]], *,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 progress: bool = True) -> list[str]:
    """Write the tensors of `specs` into `folder` as diffusers' shards plus their index.

    `fetch(names)` yields (name, tensor) for the names of one shard, in any order, each tensor
    in any dtype (it is cast to its spec's dtype as it arrives; a tensor that already has it is
    kept as it is). Returns the files written. A progress bar counts the bytes written."""
    split = plan_shards(specs, max_shard_size)
    total = sum(spec.nbytes for spec in specs.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="export",
               disable=not progress)
    for filename, names in split.filename_to_tensors.items():
        shard: dict[str, torch.Tensor] = {}
        for name, tensor in fetch(list(names)):
            spec = specs[name]
            if tuple(tensor.shape) != spec.shape:
                raise ExportError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                                  f"{spec.shape}")
            shard[name] = tensor.to(spec.dtype).contiguous()
            del tensor  # the source (e.g. fp32 before a bf16 export) can go now
            bar.update(spec.nbytes)
        missing = sorted(set(names) - set(shard))
        if missing:
            raise ExportError(f"no tensor {missing[0]!r} was handed over for {filename}")
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
    bar.close()
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": total},
                 "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)


def groups_within(names: list[str], nbytes: Callable[[str], int],
                  budget: int) -> Iterator[list[str]]:
    """`names` in runs whose total bytes stay within `budget` (at least one name per run)."""
    run: list[str] = []
    size = 0
    for name in names:
        if run and size + nbytes(name) > budget:
            yield run
            run, size = [], 0
        run.append(name)
        size += nbytes(name)
    if run:
        yield run


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def check_complete(folder: Path) -> None:
    """Refuse a half-written export: one still marked, or an `out` whose partial folder is all
    there is."""
    if (folder / INCOMPLETE).exists():
        raise ExportError(f"{folder} is a half-written export (interrupted before it was "
                          "complete); export again")
    partial = folder.parent / f".{folder.name}.partial"
    if not folder.exists() and partial.is_dir():
        raise ExportError(f"{folder} does not exist: an export into it was interrupted "
                          f"(half written in {partial}); export again")


class WeightsFolder:
    """The tensors of an exported folder, read in their stored dtype, whole or a slice at a
    time (`safe_open` memory-maps a shard; only what is read leaves the disk).

    Opening checks the index and every shard it names: a missing or truncated shard, or a
    tensor that is not where the index says, raises ExportError naming the file. Each read maps
    its shard anew and unmaps it after, so the pages of a shard that a rank touched are never
    held beyond the tensor being read (they would count in its resident memory)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = folder = Path(folder)
        check_complete(folder)
        if (folder / INDEX).is_file():
            try:
                weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise ExportError(f"{folder / INDEX} is corrupt: {err}") from None
        else:
            single = next((folder / n for n in (WEIGHTS, LEGACY_WEIGHTS)
                           if (folder / n).is_file()), None)
            if single is None:
                raise ExportError(f"{folder} holds no weights: neither {INDEX} nor {WEIGHTS} "
                                  f"(nor an earlier export's {LEGACY_WEIGHTS})")
            weight_map, files = None, [single.name]
        self.specs: dict[str, TensorSpec] = {}
        where: dict[str, str] = {}
        for name in files:
            if not (folder / name).is_file():
                raise ExportError(f"{folder / INDEX} names the shard {name}, which is missing")
            with self._open(name) as shard:
                for key in shard.keys():
                    view = shard.get_slice(key)
                    self.specs[key] = TensorSpec(tuple(view.get_shape()),
                                                 _DTYPES[view.get_dtype()])
                    where[key] = name
        for key, name in (weight_map or {}).items():
            if where.get(key) != name:
                raise ExportError(f"{folder / INDEX} places {key!r} in {name}, which does not "
                                  "hold it")
        self._where = weight_map or where

    def _open(self, name: str):
        try:
            return safe_open(str(self.folder / name), "pt")
        except (SafetensorError, OSError) as err:
            raise ExportError(f"{self.folder / name} is corrupt or truncated: {err}") from None

    @property
    def names(self) -> list[str]:
        return sorted(self._where)

    @property
    def shard_files(self) -> list[str]:
        return sorted(set(self._where.values()))

    def spec(self, name: str) -> TensorSpec:
        if name not in self.specs:
            raise ExportError(f"{self.folder} has no tensor {name!r}")
        return self.specs[name]

    def read(self, name: str, index: Optional[tuple[slice, ...]] = None) -> torch.Tensor:
        """Tensor `name` in its stored dtype; with `index`, only that slice of it is read."""
        self.spec(name)
        with self._open(self._where[name]) as shard:
            if index is None:
                return shard.get_tensor(name)
            return shard.get_slice(name)[index]
