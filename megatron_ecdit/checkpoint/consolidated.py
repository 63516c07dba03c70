"""The consolidated format: one folder with `config.json` and `model.safetensors`.

It holds the full (unsharded) weights of the single-process model, raw or EMA, in fp32 or
bf16, under their parameter names, and the run's config. `load_pretrained` builds the model
from it in a plain process, without torch.distributed, for sampling or inspection.
Exported by `export` from a training checkpoint; `tools/convert_checkpoint.py import` turns it
back into a training checkpoint at any layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megatron_ecdit.checkpoint import distributed
from megatron_ecdit.checkpoint.distributed import CheckpointError
from megatron_ecdit.config import Config, load_config
from megatron_ecdit.models.ecdit import ECDiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHTS = "model.safetensors"


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, weights: str = "ema",
           dtype: str = "fp32") -> Path:
    """A training checkpoint (any layout) -> a consolidated folder. One process."""
    from megatron_ecdit.parallel.layout import ParallelLayout
    from megatron_ecdit.parallel.setup import initialize_parallel

    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', not {weights!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    common = distributed.read_common(checkpoint)
    cfg = load_config(base=common["config"], overrides=one_process_overrides())
    ctx = initialize_parallel(ParallelLayout.build(cfg, world_size=1))
    model = ECDiT(cfg.model, cfg.moe, ctx)
    distributed.load_weights(checkpoint, [model], which=weights)
    state = {name: p.detach().to(DTYPES[dtype]).contiguous()
             for name, p in model.named_parameters()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    info = {"step": common["step"], "weights": weights, "dtype": dtype,
            "source_layout": common["layout"]}
    (out / "config.json").write_text(json.dumps({"config": common["config"], "export": info},
                                                indent=1, sort_keys=True))
    return out


def one_process_overrides() -> list[str]:
    """Config overrides that turn a saved run's layout into one process."""
    return ["parallel.tp=1", "parallel.sp=false", "parallel.pp=1", "parallel.vpp=1",
            "parallel.ep=1", "parallel.etp=null"]


def read(folder: str | os.PathLike) -> tuple[Config, dict[str, torch.Tensor], dict[str, Any]]:
    """(config at one process, full fp32 weights, export info) of a consolidated folder."""
    folder = Path(folder)
    for name in ("config.json", WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a consolidated checkpoint: {name} is missing")
    try:
        meta = json.loads((folder / "config.json").read_text())
        cfg = load_config(base=meta["config"], overrides=one_process_overrides())
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{folder}/config.json is corrupt: {err}") from None
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{folder}/{WEIGHTS} is corrupt or truncated: {err}") from None
    return cfg, {k: v.float() for k, v in state.items()}, meta.get("export", {})


def load_pretrained(folder: str | os.PathLike) -> tuple[Config, ECDiT]:
    """The model of a consolidated folder, in eval mode, in a plain process."""
    cfg, state, _ = read(folder)
    model = ECDiT(cfg.model, cfg.moe)
    check_state(state, model, folder)
    model.load_state_dict(state, strict=False)
    return cfg, model.eval()


def check_state(state: dict[str, torch.Tensor], model: torch.nn.Module, source: Any) -> None:
    """Name the first parameter that `state` lacks or has at another shape."""
    for name, param in model.named_parameters():
        if name not in state:
            raise CheckpointError(f"{source}: missing tensor {name!r}")
        if state[name].shape != param.shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape "
                                  f"{tuple(state[name].shape)}, the model expects "
                                  f"{tuple(param.shape)}")
