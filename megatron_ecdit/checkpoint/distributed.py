"""Training checkpoints with megatron-core dist_checkpointing (torch_dist format).

A checkpoint is a folder `checkpoints/step_NNNNNNN/` that every rank writes its shards into:
  model.*       weights, described in model space (see sharded.py), expert shards included
  ema.*         EMA weights, sharded like the weights
  optimizer.*   the backend's state (moments and fp32 master weights), also in model space,
                so it follows the weights to another layout
  rank_state    per data-parallel rank: the data loader's position and the noise generator
  common.pt     (rank 0) step, config, layout
It is written under `.tmp-step_NNNNNNN/` and renamed into place once every rank has finished;
`latest` is written after that, so a crash mid-save leaves the previous checkpoint and pointer
intact. The last `keep_last` checkpoints are kept. The folder is assumed to be on a file system
every rank sees (as on a cluster's shared storage).

Resharding: the weights, EMA and optimizer state load at any layout and with either ZeRO
backend. The per-rank state (data position, generator) is restored only when the data-parallel
size is unchanged; otherwise the data stream restarts from its seed and that is logged.

Loading never unpickles untrusted content: tensors and the common state are read with
torch.load(weights_only=True) (dist_checkpointing's and torch's defaults), and torch's own
`.metadata` index is checked with a restricted unpickler (`verify`) before torch reads it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_ecdit.checkpoint import sharded


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign or does not fit the model."""


@dataclass
class Parts:
    """What a training job checkpoints, seen from one rank."""

    chunks: list[torch.nn.Module]  # this rank's model chunks (one unless virtual pipelining)
    # EMA weights shaped like the parameters, keyed like named_parameters of the whole model;
    # a load writes into these tensors.
    ema: dict[str, torch.Tensor]
    ema_names: dict[str, tuple[int, str]]  # EMA key -> (chunk, model-space parameter name)
    # The optimizer backend (parallel/backends.OptimizerBackend): its optimizer state, the
    # copies of the weights it keeps, and `gathered()`, inside which every parameter is whole.
    backend: Any
    rank_state: Callable[[], dict]  # per-data-parallel-rank state (data position, generator)


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder a user means: a `step_N` folder as it is, a checkpoints folder
    (its `latest`), or the `latest` pointer file itself (as megatron's tools resolve the
    latest iteration)."""
    path = Path(path)
    root = None
    if path.is_file() and path.name == "latest":
        root = path.parent
    elif path.is_dir() and (path / "latest").is_file():
        root = path
    if root is None:
        return path
    found = latest_checkpoint(root)
    if found is None:
        raise CheckpointError(f"{root / 'latest'} points to "
                              f"{(root / 'latest').read_text().strip()!r}, which is not there")
    return found


def _publish(root: Path, tmp: Path, final: Path, keep_last: int) -> None:
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------


def _state(parts: Parts, *, is_loading: bool, with_optimizer: bool, with_rank_state: bool,
           rank_template=None):
    model = sharded.model_state(parts.chunks)
    state = {"model": model,
             "ema": sharded.like_params(parts.chunks, parts.ema, "ema.", parts.ema_names)}
    if with_optimizer:
        state["optimizer"] = parts.backend.sharded_state_dict(model, is_loading)
    if with_rank_state:
        dp, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        replica = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), 0)
        data = rank_template if rank_template is not None else parts.rank_state()
        state["rank_state"] = ShardedObject("rank_state", data, (dp_size,), (dp,),
                                            replica_id=replica)
    return state


def save(root: str | os.PathLike, step: int, parts: Parts, common: dict[str, Any],
         keep_last: int = 2, queue: Optional[AsyncCallsQueue] = None,
         weights_only: bool = False) -> Path:
    """Collective: every rank writes its shards, then rank 0 publishes the folder. Call it
    inside `parts.backend.gathered()`, where every parameter is whole.

    With `weights_only` the checkpoint holds weights and EMA only: it starts a run (e.g.
    fine-tuning) with fresh optimizer state at step 0.
    With a `queue` the shards are written by a forked process (a copy-on-write snapshot of this
    moment's tensors) while training goes on, and the folder is published when the queue
    finalizes the save (`queue.maybe_finalize_async_calls`, collective)."""
    root = Path(root)
    final, tmp = root / f"step_{step:07d}", root / f".tmp-step_{step:07d}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = _state(parts, is_loading=False, with_optimizer=not weights_only,
                   with_rank_state=not weights_only)
    state["common"] = {"step": step, "dp_size": ps.get_data_parallel_world_size(),
                       "weights_only": weights_only,
                       "optimizer_backend": (None if weights_only
                                             else parts.backend.checkpoint_format),
                       **common}

    def publish() -> None:
        dist.barrier()
        if dist.get_rank() == 0:
            _publish(root, tmp, final, keep_last)
        dist.barrier()

    if queue is None:
        dist_checkpointing.save(state, str(tmp))
        publish()
    else:
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        request.add_finalize_fn(publish)
        queue.schedule_async_request(request)
    return final


def read_common(path: str | os.PathLike) -> dict[str, Any]:
    """The step, config and layout a checkpoint was saved with (after `verify`). `path` may
    also be a checkpoints folder or its `latest` pointer."""
    path = resolve_checkpoint(path)
    verify(path)
    return dist_checkpointing.load_common_state_dict(str(path))["common"]


def load(path: str | os.PathLike, parts: Parts) -> tuple[dict[str, Any], Optional[dict],
                                                          list[str]]:
    """Collective: load weights and EMA, and the optimizer state when the checkpoint has the
    same optimizer backend, in place (the weights through `parts.backend.gathered`). Returns
    the common state, this rank's saved per-rank state (None when the checkpoint is
    weights-only or the data-parallel size changed), and notes on what was not restored."""
    path = resolve_checkpoint(path)
    common = read_common(path)
    notes = []
    with_optimizer = not common["weights_only"]
    if with_optimizer and common["optimizer_backend"] != parts.backend.checkpoint_format:
        with_optimizer = False
        notes.append(f"optimizer state not restored: saved by {common['optimizer_backend']}, "
                     f"this run uses {parts.backend.checkpoint_format}")
    with_rank_state = (not common["weights_only"]
                       and common["dp_size"] == ps.get_data_parallel_world_size())
    if not common["weights_only"] and not with_rank_state:
        notes.append(f"data-parallel size changed ({common['dp_size']} -> "
                     f"{ps.get_data_parallel_world_size()}): the data stream and noise generator "
                     "restart from their seeds")
    with parts.backend.gathered(modify=True):
        _check_shapes(path, parts.chunks)
        state = _state(parts, is_loading=True, with_optimizer=with_optimizer,
                       with_rank_state=with_rank_state, rank_template={})
        # The weights and EMA tensors the ShardedTensors describe, to copy the loaded values
        # into.
        targets = {group: {entry: sh.data for entry, sh in state[group].items()}
                   for group in ("model", "ema")}
        loaded = dist_checkpointing.load(state, str(path))
        with torch.no_grad():
            for group, tensors in targets.items():
                for entry, tensor in loaded[group].items():
                    tensors[entry].copy_(tensor)
    # The backend's own copies of the weights (fp32 master partitions, main parameters) follow
    # the loaded parameters; otherwise its next step would write the old weights back.
    parts.backend.reload_model_params()
    if with_optimizer:
        parts.backend.load_state_dict(loaded["optimizer"], common["step"])
    return common, loaded.get("rank_state"), notes


def load_weights(path: str | os.PathLike, chunks: list[torch.nn.Module],
                 which: str = "model") -> dict[str, Any]:
    """Collective: load the weights (`which="model"`) or the EMA weights (`"ema"`) of a
    checkpoint into `chunks` at this rank's layout; returns the checkpoint's common state."""
    path = resolve_checkpoint(path)
    common = read_common(path)
    _check_shapes(path, chunks)
    model = sharded.model_state(chunks, prefix=f"{which}.")
    targets = {entry: sh.data for entry, sh in model.items()}
    for sh in model.values():  # load into copies: the parameters stay untouched until the end
        sh.data = torch.empty_like(sh.data)
    loaded = dist_checkpointing.load({which: model}, str(path))[which]
    with torch.no_grad():
        for entry, tensor in loaded.items():
            targets[entry].copy_(tensor)
    return common


def _check_shapes(path: str | os.PathLike, chunks: list[torch.nn.Module]) -> None:
    """Name the first tensor whose full shape differs from the model's, or that is missing."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    for sh in sharded.model_state(chunks).values():
        if sh.key not in saved:
            raise CheckpointError(f"{path}: no tensor {sh.key!r} (is it a checkpoint of this "
                                  "model?)")
        if tuple(saved[sh.key].global_shape) != tuple(sh.global_shape):
            raise CheckpointError(
                f"{path}: tensor {sh.key!r} has shape {tuple(saved[sh.key].global_shape)}, "
                f"the model expects {tuple(sh.global_shape)}")


# --------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------

_METADATA_MODULES = ("torch.distributed.checkpoint.", "torch._utils", "collections")
_METADATA_GLOBALS = {("torch", "Size"), ("builtins", "set"), ("builtins", "frozenset"),
                     ("builtins", "slice"), ("torch", "device"),
                     ("torch.serialization", "_get_layout")}


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes torch.distributed.checkpoint's index is made of, and dtypes."""

    def find_class(self, module: str, name: str):
        if (module.startswith(_METADATA_MODULES) or (module, name) in _METADATA_GLOBALS
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def verify(path: str | os.PathLike) -> None:
    """Check that `path` is a complete torch_dist checkpoint before anything loads it: the
    files exist, the index holds only index classes, and every data file is long enough for
    the items the index places in it. Raises CheckpointError naming the part at fault."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint: {name} is missing")
    try:
        backend = json.loads((path / "metadata.json").read_text()).get("sharded_backend")
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}/metadata.json is corrupt: {err}") from None
    if backend != "torch_dist":
        raise CheckpointError(f"{path}: sharded_backend {backend!r}, expected 'torch_dist'")
    try:
        index = _MetadataUnpickler(io.BytesIO((path / ".metadata").read_bytes())).load()
    except Exception as err:  # truncated or foreign index
        raise CheckpointError(f"{path}/.metadata is corrupt or foreign: {err}") from None
    needed: dict[str, int] = {}
    for info in (getattr(index, "storage_data", None) or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: data file {name} is missing")
        if file.stat().st_size < size:
            raise CheckpointError(f"{path}: data file {name} is truncated "
                                  f"({file.stat().st_size} of {size} bytes)")
