"""Exported weights: a training checkpoint as a diffusers model folder, and back at any layout.

An export holds the full (unsharded) weights of the single-process model, raw or EMA, in fp32
or bf16, under their parameter names (`checkpoint/exported.py`: diffusers' sharded safetensors),
with a diffusers `config.json` for `pipelines.ECDiTTransformer2DModel` (the model and MoE
sections flat; the run's whole config and what the export was made from under `_ecdit`).

At the size of M-64E nothing here holds a model:
- `write_transformer` / `export` stream a training checkpoint of any layout into shards:
  dist_checkpointing loads a bounded group of tensors at a time (at most the largest tensor's
  bytes), each is cast to the export dtype and joins the shard being filled; the names and
  shapes come from the checkpoint's index, checked against the model built on the meta device.
  Peak memory: one shard, plus one group, plus one cast tensor.
- `load_into` fills a model at any layout from an export: each rank reads, with safetensors'
  `get_slice`, only the slices of the tensors it holds, in their stored dtype, copied (widened
  where the layout's parameters are fp32) one tensor at a time.
- `load_pretrained` builds the model on the meta device and assigns the stored tensors to it
  (bf16 stays bf16 unless asked), in a plain process without torch.distributed.
`open_export` accepts a model folder, a pipeline folder (its `transformer/`) and an earlier
export's `config.json` + `model.safetensors`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_ecdit.checkpoint import distributed
from megatron_ecdit.checkpoint.distributed import CheckpointError
from megatron_ecdit.checkpoint.exported import (DEFAULT_MAX_SHARD_SIZE, INCOMPLETE, INDEX,
                                                LEGACY_WEIGHTS, WEIGHTS, TensorSpec,
                                                WeightsFolder, check_complete, groups_within,
                                                staged, write_shards)
from megatron_ecdit.config import Config, load_config, transformer_kwargs
from megatron_ecdit.layers.tensor_parallel import ParallelContext
from megatron_ecdit.models.ecdit import ECDiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRANSFORMER_CLASS = "ECDiTTransformer2DModel"  # pipelines/transformer_ecdit.py


def one_process_overrides() -> list[str]:
    """Config overrides that turn a saved run's layout into one process."""
    return ["parallel.tp=1", "parallel.sp=false", "parallel.pp=1", "parallel.vpp=1",
            "parallel.ep=1", "parallel.etp=null"]


def meta_model(cfg: Config) -> ECDiT:
    """The single-process model on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return ECDiT(cfg.model, cfg.moe, ParallelContext.meta())


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, **kwargs) -> Path:
    """A training checkpoint (any layout) -> a model folder `out`, written under a temporary
    name and renamed when complete. Keyword arguments as `write_transformer`."""
    with staged(out) as tmp:
        write_transformer(checkpoint, tmp, **kwargs)
    return Path(out)


def write_transformer(checkpoint: str | os.PathLike, folder: str | os.PathLike, *,
                      weights: str = "ema", dtype: str = "fp32",
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                      progress: bool = True) -> Config:
    """Stream the weights (`"model"`) or EMA weights (`"ema"`) of a training checkpoint into
    `folder` as diffusers shards of at most `max_shard_size` in `dtype`, with config.json.
    One process. Returns the run's config at one process."""
    from megatron.core import dist_checkpointing

    from megatron_ecdit.parallel.setup import init_distributed

    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', not {weights!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    path = distributed.resolve_checkpoint(checkpoint)
    common = distributed.read_common(path)
    cfg = load_config(base=common["config"], overrides=one_process_overrides())
    init_distributed()  # a one-process world: dist_checkpointing loads through it
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    specs, stored = {}, {}
    for name, param in meta_model(cfg).named_parameters():
        key = f"{weights}.{name}"
        if key not in saved:
            raise CheckpointError(f"{path}: no tensor {key!r} (is it a checkpoint of this "
                                  "model?)")
        if tuple(saved[key].global_shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape "
                                  f"{tuple(saved[key].global_shape)}, the model expects "
                                  f"{tuple(param.shape)}")
        specs[name] = TensorSpec(tuple(param.shape), DTYPES[dtype])
        stored[name] = TensorSpec(tuple(param.shape), saved[key].dtype)
    budget = max(spec.nbytes for spec in stored.values())  # groups of at most the largest tensor

    def fetch(names: list[str]):
        for group in groups_within(names, lambda n: stored[n].nbytes, budget):
            loaded = _load_group(path, weights, {n: stored[n] for n in group})
            for name in group:
                yield name, loaded.pop(name)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_shards(folder, specs, fetch, max_shard_size=max_shard_size, progress=progress)
    info = {"step": common["step"], "weights": weights, "dtype": dtype,
            "source_layout": common["layout"]}
    write_config(folder, common["config"], info)
    return cfg


def _load_group(path: Path, which: str, specs: dict[str, TensorSpec]) -> dict[str, torch.Tensor]:
    """Full tensors `which.NAME` of a checkpoint, in their stored dtype (dist_checkpointing
    reads only the chunks they are made of)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    state = {name: ShardedTensor.from_rank_offsets(f"{which}.{name}",
                                                   torch.empty(spec.shape, dtype=spec.dtype),
                                                   replica_id=0)
             for name, spec in specs.items()}
    loaded = dist_checkpointing.load({which: state}, str(path))[which]
    return {name: loaded[name] for name in specs}


def write_config(folder: Path, run_config: dict[str, Any], info: dict[str, Any]) -> None:
    """config.json as diffusers writes it for ECDiTTransformer2DModel: its init arguments,
    plus the run's config and the export's provenance under the private `_ecdit`."""
    import diffusers

    cfg = load_config(base=run_config, overrides=one_process_overrides())
    data = {"_class_name": TRANSFORMER_CLASS, "_diffusers_version": diffusers.__version__,
            **transformer_kwargs(cfg.model, cfg.moe),
            "_ecdit": {"config": run_config, "export": info}}
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Reading an export
# --------------------------------------------------------------------------------------------


@dataclass
class Export:
    """An exported model folder opened for reading."""

    folder: Path  # the model folder itself (a pipeline's transformer/)
    run_config: dict[str, Any]  # the run's config, at the layout it was saved at
    cfg: Config  # the same at one process
    weights: WeightsFolder
    info: dict[str, Any]  # step, weights (ema/model), dtype, source layout


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is an exported folder (model, pipeline or earlier single-file one), or
    where an interrupted export was going."""
    path = Path(path)
    marks = ("config.json", "model_index.json", INCOMPLETE, WEIGHTS, INDEX, LEGACY_WEIGHTS)
    return (any((path / name).is_file() for name in marks)
            or (not path.exists() and (path.parent / f".{path.name}.partial").is_dir()))


def open_export(folder: str | os.PathLike) -> Export:
    """The run's config, the weights and the export's provenance of an exported folder."""
    folder = Path(folder)
    check_complete(folder)
    if (folder / "model_index.json").is_file():  # a pipeline: the model is its transformer/
        folder = folder / "transformer"
        check_complete(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not an exported model: config.json is missing")
    try:
        meta = json.loads((folder / "config.json").read_text())
        # an earlier export: {"config": ..., "export": ...}; now diffusers' flat config
        saved = meta["_ecdit"] if "_ecdit" in meta else meta
        run_config, info = saved["config"], saved.get("export", {})
        cfg = load_config(base=run_config, overrides=one_process_overrides())
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}/config.json is corrupt: {err}") from None
    return Export(folder, run_config, cfg, WeightsFolder(folder), info)


def load_into(chunks: list[torch.nn.Module], weights: WeightsFolder,
              ctx: ParallelContext) -> None:
    """Fill this rank's model chunks from an export: each parameter's slice of the full tensor
    (`parallel.sharding.slice_of`) is read alone, in its stored dtype, and copied in."""
    from megatron_ecdit.parallel.sharding import full_shape, slice_of

    with torch.no_grad():
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                spec, shape = weights.spec(name), full_shape(param, ctx)
                if spec.shape != shape:
                    raise CheckpointError(f"{weights.folder}: tensor {name!r} has shape "
                                          f"{spec.shape}, the model expects {shape}")
                param.copy_(weights.read(name, slice_of(param, shape, ctx)))


def load_pretrained(folder: str | os.PathLike,
                    dtype: Optional[str] = None) -> tuple[Config, ECDiT]:
    """The model of an exported folder, in eval mode, in a plain process (no torch.distributed).

    Built on the meta device; the stored tensors become its parameters as they are (bf16
    stays bf16), or cast to `dtype` ("fp32", "bf16") one tensor at a time."""
    from accelerate import init_empty_weights

    exported = open_export(folder)
    with init_empty_weights():  # parameters on the meta device; buffers (positions) real
        model = ECDiT(exported.cfg.model, exported.cfg.moe, ParallelContext.meta())
    state = {}
    for name, param in model.named_parameters():
        spec = exported.weights.spec(name)
        if spec.shape != tuple(param.shape):
            raise CheckpointError(f"{exported.folder}: tensor {name!r} has shape {spec.shape}, "
                                  f"the model expects {tuple(param.shape)}")
        tensor = exported.weights.read(name)
        state[name] = tensor if dtype is None else tensor.to(DTYPES[dtype])
    # not strict: megatron-core's linear layers expect an (empty) `_extra_state` each
    model.load_state_dict(state, strict=False, assign=True)
    return exported.cfg, model.eval()
