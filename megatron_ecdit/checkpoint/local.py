"""Single-process checkpoints: safetensors for weights, atomic publish, `latest` pointer.

A checkpoint is a folder `step_NNNNNNN/` holding model.safetensors, ema.safetensors,
optimizer.pt (tensors and plain numbers only, read back with weights_only=True; the learning
rate is a function of the step) and meta.json.
It is written under a temporary name and renamed into place; `latest` is written after that,
so a crash mid-save leaves the previous checkpoint and pointer intact. The last `keep_last`
checkpoints are kept. Distributed (sharded) checkpoints are a separate module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def tensor_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of tensors only (megatron-core layers add None `_extra_state` entries)."""
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor)}


def save_checkpoint(root: str | os.PathLike, step: int, *, model: nn.Module,
                    ema: Optional[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], keep_last: int = 2) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensor_state(model), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save({"optimizer": optimizer.state_dict()}, tmp / "optimizer.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_weights(path: str | os.PathLike, model: nn.Module, *, ema: bool = False) -> None:
    """Load model (or EMA) weights; a missing or mis-shaped tensor is named in the error."""
    file = Path(path) / ("ema.safetensors" if ema else "model.safetensors")
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {file.name}")
    state = load_file(str(file))
    own = tensor_state(model)
    for name, value in own.items():
        if name not in state:
            raise KeyError(f"{file}: missing tensor {name!r}")
        if state[name].shape != value.shape:
            raise ValueError(f"{file}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                             f"the model expects {tuple(value.shape)}")
    model.load_state_dict({k: state[k] for k in own}, strict=False)


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(path) / "optimizer.pt", weights_only=True)
