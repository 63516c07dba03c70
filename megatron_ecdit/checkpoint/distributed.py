"""Training checkpoints with megatron-core dist_checkpointing (torch_dist format).

A checkpoint is a folder `checkpoints/step_NNNNNNN/` that every rank writes its shards into:
  model.*       weights, described in model space (see sharded.py), expert shards included
  ema.*         EMA weights, sharded like the weights
  optimizer.*   the backend's state (moments and fp32 main weights); see "Optimizer state"
  rank_state    per data-parallel rank: the data loader's position and the noise generator
  common.pt     (rank 0) step, config, layout, how the optimizer state was saved
It is written under `.tmp-step_NNNNNNN/` and renamed into place once every rank has finished;
`latest` is written after that, so a crash mid-save leaves the previous checkpoint and pointer
intact, and the next complete save removes what a crashed one left. The last `keep_last`
checkpoints are kept; older ones are deleted by rank 0 in the background, holding no rank. The
folder is assumed to be on a file system every rank sees (as on a cluster's shared storage).

Writing and reading are fully parallel (`Checkpointer`, megatron-core's
`FullyParallelSaveStrategyWrapper` / `FullyParallelLoadStrategyWrapper` over the data-parallel
group, as Megatron-LM's --ckpt-fully-parallel-save/-load): a tensor replicated over data
parallelism is written by one of its replicas, chosen so that every rank writes about as much,
and read from storage once, then exchanged. One strategy serves every save of a run, so its
plan and metadata are computed once (cached) and the sharding is validated on the first save
only. With `async_save` a forked process writes while training goes on; the step waits for it
only when the previous save is still being written.

Optimizer state: megatron-core's distributed optimizer writes each rank's own buffers
(`dp_reshardable`: no gather, no copy), which load at any data-parallel size but only at the
same TP, PP, VPP, EP and expert-TP (and gradient buckets); `checkpoint.optimizer_sharding:
fully_reshardable` writes it in model space instead, gathered over the data-parallel group on
every rank, loadable at any layout. The other backends write full tensors, loadable anywhere.
Weights and EMA load at any layout and with either ZeRO backend; optimizer state the common
state does not allow to restore is skipped, and the load says so. The per-rank state (data
position, generator) is restored only when the data-parallel size is unchanged.

A save that fails (no space, no permission, a lost filesystem) removes its own partial folder,
keeps `latest` and raises SaveError on every rank, naming the folder and the OS error; so does
an asynchronous save when its failure is seen. A load resolves `latest` on rank 0, and every
rank checks that it can read that folder and loaded that step.

Loading never unpickles untrusted content: tensors and the common state are read with
torch.load(weights_only=True) (dist_checkpointing's and torch's defaults), and torch's own
`.metadata` index is checked with a restricted unpickler (`verify`) before torch reads it.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper, FullyParallelSaveStrategyWrapper)
from megatron.core.dist_checkpointing.strategies.torch import (TorchDistLoadShardedStrategy,
                                                               TorchDistSaveShardedStrategy)
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ecdit.checkpoint import sharded


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign or does not fit the model."""


class SaveError(CheckpointError):
    """A save that could not be completed; the previous checkpoint and `latest` stand."""


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


def _state(parts: Parts, *, is_loading: bool, with_optimizer: bool, with_rank_state: bool,
           rank_template=None, sharding: Optional[str] = None):
    model = sharded.model_state(parts.chunks)
    state = {"model": model,
             "ema": sharded.like_params(parts.chunks, parts.ema, "ema.", parts.ema_names)}
    if with_optimizer:
        state["optimizer"] = parts.backend.sharded_state_dict(model, is_loading, sharding)
    if with_rank_state:
        dp, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        replica = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), 0)
        data = rank_template if rank_template is not None else parts.rank_state()
        state["rank_state"] = ShardedObject("rank_state", data, (dp_size,), (dp,),
                                            replica_id=replica)
    return state




def _everyone_agrees(message: Optional[str]) -> list[tuple[int, str]]:
    """Collective: the (rank, message) of every rank that reports a problem."""
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return [(rank, m) for rank, m in enumerate(messages) if m is not None]


def _from_rank0(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _os_error(err: BaseException) -> str:
    """The OS error behind an exception chain (megatron and torch wrap their writers'
    failures), or else the innermost exception's first line."""
    seen: set[int] = set()
    stack, last = [err], err
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        last = e
        if isinstance(e, OSError) and e.errno is not None:
            return f"{os.strerror(e.errno)} ([Errno {e.errno}])"
        stack += [x for x in (e.__cause__, e.__context__) if x is not None]
        for failure in getattr(e, "failures", {}).values():  # torch's CheckpointException
            failure = failure[0] if isinstance(failure, tuple) else failure  # (exc, traceback)
            if isinstance(failure, BaseException):
                stack.append(failure)
    lines = str(last).strip().splitlines()
    return lines[0].strip() if lines else type(last).__name__


class Checkpointer:
    """How one run writes and reads its checkpoints under `root` (see the module docstring).

    Collective: every rank calls `save`, `finalize` and `load` together."""

    def __init__(self, root: str | os.PathLike, *, keep_last: int = 2, async_save: bool = False,
                 optimizer_sharding: str = "dp_reshardable"):
        self.root = Path(root)
        self.keep_last = keep_last
        self.optimizer_sharding = optimizer_sharding
        self.queue = AsyncCallsQueue() if async_save else None
        self._strategies: dict[bool, FullyParallelSaveStrategyWrapper] = {}  # by weights_only
        self._in_flight: list[Path] = []  # asynchronous saves not yet published
        self._deleting: list[threading.Thread] = []
        self._needed = 0.0  # bytes the last save was expected to need

    # ---------------------------------------------------------------- saving

    def _strategy(self, weights_only: bool) -> tuple[FullyParallelSaveStrategyWrapper, bool]:
        """The run's save strategy for this kind of checkpoint, and whether it is its first use
        (validate the sharding then)."""
        first = weights_only not in self._strategies
        if first:
            base = TorchDistSaveShardedStrategy("torch_dist", 1, cached_metadata=True)
            self._strategies[weights_only] = FullyParallelSaveStrategyWrapper(
                base, ps.get_data_parallel_group(with_context_parallel=True),
                do_cache_distribution=True)
        return self._strategies[weights_only], first

    def save(self, step: int, parts: Parts, common: dict[str, Any],
             weights_only: bool = False) -> Path:
        """Write step `step`; call it inside `parts.backend.gathered()`, where every parameter
        is whole. Returns the folder it is (or, asynchronously, will be) published at.

        With `weights_only` the checkpoint holds weights and EMA only: it starts a run (e.g.
        fine-tuning) with fresh optimizer state at step 0."""
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".tmp-step_{step:07d}"
        problem = None
        if dist.get_rank() == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as err:
                problem = _os_error(err)
        problem = _from_rank0(problem)
        if problem:
            raise SaveError(f"cannot save checkpoint {final}: cannot create {tmp}: {problem}")
        sharding = None if weights_only else self.optimizer_sharding
        state = _state(parts, is_loading=False, with_optimizer=not weights_only,
                       with_rank_state=not weights_only, sharding=sharding)
        state["common"] = {"step": step, "dp_size": ps.get_data_parallel_world_size(),
                           "weights_only": weights_only,
                           "optimizer_backend": (None if weights_only
                                                 else parts.backend.checkpoint_format),
                           "optimizer_sharding": sharding,
                           "optimizer_layout": (None if weights_only
                                                else parts.backend.optimizer_layout),
                           **common}
        self._check_space(tmp, final, state)
        strategy, first = self._strategy(weights_only)
        try:
            request = dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy,
                                              validate_access_integrity=first,
                                              async_sharded_save=True)
            request.add_finalize_fn(lambda: self._publish(tmp, final, step))
            if self.queue is None:
                request.execute_sync()
            else:
                self._in_flight.append(tmp)
                self.queue.schedule_async_request(request)  # copies what the writer needs
        except (Exception, CheckpointException) as err:  # raised on every rank when any
            message = self._failure(final, tmp, err)           # writer failed (megatron)
            self._abandon([tmp])
            raise SaveError(message) from None
        return final

    def _check_space(self, tmp: Path, final: Path, state: dict) -> None:
        """Collective: refuse a save the file system cannot hold, before writing anything. Every
        rank counts the tensors of which it holds the main replica (each is written once)."""
        mine = sum(sh.data.numel() * sh.data.element_size()
                   for sh in nested_values(state)
                   if isinstance(sh, ShardedTensor) and sh.data is not None
                   and all(r == 0 for r in (sh.replica_id if isinstance(sh.replica_id, tuple)
                                            else (sh.replica_id,))))
        needed = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(needed)
        free = _from_rank0(shutil.disk_usage(tmp).free if dist.get_rank() == 0 else None)
        margin = 1.05 * int(needed) + (2 << 20)  # the index, common state, rank states
        self._needed = margin
        if free < margin:
            self._abandon([tmp])
            raise SaveError(f"cannot save checkpoint {final}: the disk is full: it needs about "
                            f"{margin / 1e6:.0f} MB, {free / 1e6:.0f} MB are free on the file "
                            f"system of {self.root} ({os.strerror(errno.ENOSPC)}); latest "
                            "still points to the previous checkpoint")

    def _failure(self, final: Path, tmp: Path, err: BaseException) -> str:
        """One line for a failed save. torch's writer may hide ENOSPC behind its own message
        ("unexpected pos ..."): a file system left with less than the save needed was full."""
        reason = _os_error(err)
        try:
            full = shutil.disk_usage(self.root).free < max(self._needed, 1 << 20)
        except OSError:
            full = False
        if "No space left" in reason or "Errno 28" in reason or full:
            reason = f"the disk is full ({reason})"
        return (f"saving checkpoint {final} failed: {reason}; {tmp} was removed and latest "
                "still points to the previous checkpoint")

    def _abandon(self, folders: list[Path]) -> None:
        """Remove the partial folders of failed saves (rank 0; the others wait for it)."""
        if dist.get_rank() == 0:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
        dist.barrier()

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        """Collective, once every rank has written: rename into place, point `latest` at it,
        clear what crashed saves left, and delete checkpoints beyond keep_last in the
        background."""
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.root / ".latest.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.root / "latest")
            old = sorted(self.root.glob("step_*"))[:-self.keep_last]
            # left by saves that crashed (never a complete checkpoint, nor one still writing)
            crashed = [p for p in self.root.glob(".tmp-step_*") if p not in self._in_flight
                       and p != tmp]
            thread = threading.Thread(target=_delete, args=(old + crashed,), daemon=False)
            thread.start()
            self._deleting.append(thread)
        if tmp in self._in_flight:
            self._in_flight.remove(tmp)
        dist.barrier()

    def finalize(self, blocking: bool = False) -> None:
        """Publish the asynchronous saves whose writers are done (all of them, waiting, if
        `blocking`); a failed one raises SaveError on every rank. Collective."""
        if self.queue is None:
            return
        try:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, CheckpointException) as err:
            failed = list(self._in_flight)
            self._in_flight.clear()
            where = failed[0] if failed else self.root
            message = self._failure(where.parent / where.name.replace(".tmp-", ""), where, err)
            self._abandon(failed)
            raise SaveError(message) from None

    def close(self) -> None:
        """Wait for the asynchronous saves and the background deletions."""
        self.finalize(blocking=True)
        for thread in self._deleting:
            thread.join()
        self._deleting.clear()

    # ---------------------------------------------------------------- loading

    def load(self, path: str | os.PathLike, parts: Parts) -> tuple[dict[str, Any],
                                                                  Optional[dict], list[str]]:
        """Load weights and EMA, and the optimizer state where the checkpoint allows it, in
        place (the weights through `parts.backend.gathered`). Returns the common state, this
        rank's saved per-rank state (None when the checkpoint is weights-only or the
        data-parallel size changed), and notes on what was not restored."""
        path, index = agreed_checkpoint(path)
        common = _common(path)
        notes = []
        with_optimizer, why = optimizer_restorable(common, parts.backend)
        if why:
            notes.append(f"optimizer state not restored: {why}")
        with_rank_state = (not common["weights_only"]
                           and common["dp_size"] == ps.get_data_parallel_world_size())
        if not common["weights_only"] and not with_rank_state:
            notes.append(f"data-parallel size changed ({common['dp_size']} -> "
                         f"{ps.get_data_parallel_world_size()}): the data stream and noise "
                         "generator restart from their seeds")
        with parts.backend.gathered(modify=True):
            _check_shapes(path, parts.chunks, index)
            state = _state(parts, is_loading=True, with_optimizer=with_optimizer,
                           with_rank_state=with_rank_state, rank_template={},
                           sharding=common.get("optimizer_sharding") or "fully_reshardable")
            # The weights and EMA tensors the ShardedTensors describe, to copy the loaded
            # values into.
            targets = {group: {entry: sh.data for entry, sh in state[group].items()}
                       for group in ("model", "ema")}
            loaded = dist_checkpointing.load(state, str(path), sharded_strategy=load_strategy())
            with torch.no_grad():
                for group, tensors in targets.items():
                    for entry, tensor in loaded[group].items():
                        tensors[entry].copy_(tensor)
        steps = _everyone_agrees(None if loaded["common"]["step"] == common["step"]
                                 else str(loaded["common"]["step"]))
        if steps:
            raise CheckpointError(f"ranks loaded different steps from {path}: {steps}")
        if with_optimizer:  # its state holds the backend's own (fp32) copies of the weights
            # the updates it applied: a skipped step (training/nonfinite.py) applies none
            parts.backend.load_state_dict(loaded["optimizer"],
                                          common["step"] - common.get("skipped_steps", 0))
        else:
            # The backend's own copies of the weights (fp32 master partitions, main parameters)
            # follow the loaded parameters; otherwise its next step would write the old ones.
            # Not after a load of its state: megatron's dp_reshardable state is loaded in place,
            # into those very copies.
            parts.backend.reload_model_params()
        return common, loaded.get("rank_state"), notes


def _delete(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def load_strategy() -> FullyParallelLoadStrategyWrapper:
    """torch_dist's reader, each replicated tensor read once in the data-parallel group and
    exchanged (broadcast)."""
    return FullyParallelLoadStrategyWrapper(
        TorchDistLoadShardedStrategy(), ps.get_data_parallel_group(with_context_parallel=True),
        exchange_algo="broadcast")


def optimizer_restorable(common: dict[str, Any], backend) -> tuple[bool, str]:
    """Whether a checkpoint's optimizer state loads into `backend`, and if not, why (empty
    for a weights-only checkpoint, which has none)."""
    if common["weights_only"]:
        return False, ""
    if common["optimizer_backend"] != backend.checkpoint_format:
        return False, (f"saved by {common['optimizer_backend']}, this run uses "
                       f"{backend.checkpoint_format}")
    saved_layout = common.get("optimizer_layout")
    if common.get("optimizer_sharding") == "dp_reshardable" \
            and saved_layout != backend.optimizer_layout:
        return False, (f"saved dp_reshardable at {saved_layout}, which loads only there (any "
                       f"data-parallel size); this run is {backend.optimizer_layout}. To move "
                       "optimizer state to another layout, save it with "
                       "checkpoint.optimizer_sharding=fully_reshardable")
    return True, ""


def agreed_checkpoint(path: str | os.PathLike) -> tuple[Path, Any]:
    """Collective: the folder rank 0 resolves `path` to (its `latest`, if it is a checkpoints
    folder or the pointer), checked on every rank (`verify`), and its index: a rank that
    cannot read it, e.g. because the folder is not on storage every rank sees, stops every
    rank with its reason."""
    chosen = None
    if dist.get_rank() == 0:
        try:
            chosen = str(resolve_checkpoint(path))
        except CheckpointError as err:
            chosen = err
    chosen = _from_rank0(chosen)
    if isinstance(chosen, CheckpointError):
        raise chosen
    problem, index = None, None
    try:
        index = verify(chosen)
    except CheckpointError as err:
        problem = str(err)
    problems = _everyone_agrees(problem)
    if problems:
        rank, message = problems[0]
        raise CheckpointError(f"rank {rank} cannot load the checkpoint rank 0 chose: {message}")
    return Path(chosen), index


def read_common(path: str | os.PathLike) -> dict[str, Any]:
    """The step, config and layout a checkpoint was saved with (after `verify`). `path` may
    also be a checkpoints folder or its `latest` pointer."""
    path = resolve_checkpoint(path)
    verify(path)
    return _common(path)


def _common(path: Path) -> dict[str, Any]:
    return dist_checkpointing.load_common_state_dict(str(path))["common"]


def load_weights(path: str | os.PathLike, chunks: list[torch.nn.Module],
                 which: str = "model") -> dict[str, Any]:
    """Collective: load the weights (`which="model"`) or the EMA weights (`"ema"`) of a
    checkpoint into `chunks` at this rank's layout; returns the checkpoint's common state."""
    path, index = agreed_checkpoint(path)
    common = _common(path)
    _check_shapes(path, chunks, index)
    model = sharded.model_state(chunks, prefix=f"{which}.")
    targets = {entry: sh.data for entry, sh in model.items()}
    for sh in model.values():  # load into copies: the parameters stay untouched until the end
        sh.data = torch.empty_like(sh.data)
    loaded = dist_checkpointing.load({which: model}, str(path),
                                     sharded_strategy=load_strategy())[which]
    with torch.no_grad():
        for entry, tensor in loaded.items():
            targets[entry].copy_(tensor)
    return common


def _check_shapes(path: str | os.PathLike, chunks: list[torch.nn.Module], index: Any) -> None:
    """Name the first tensor whose full shape differs from the model's, or that is missing
    (from the checkpoint's index, as `verify` read it)."""
    saved = index.state_dict_metadata
    for sh in sharded.model_state(chunks).values():
        if sh.key not in saved:
            raise CheckpointError(f"{path}: no tensor {sh.key!r} (is it a checkpoint of this "
                                  "model?)")
        if tuple(saved[sh.key].size) != tuple(sh.global_shape):
            raise CheckpointError(
                f"{path}: tensor {sh.key!r} has shape {tuple(saved[sh.key].size)}, "
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


def verify(path: str | os.PathLike) -> Any:
    """Check that `path` is a complete torch_dist checkpoint before anything loads it: the
    files exist, the index holds only index classes, and every data file is long enough for
    the items the index places in it. Returns the index (torch.distributed.checkpoint's
    Metadata). Raises CheckpointError naming the part at fault."""
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
    return index
