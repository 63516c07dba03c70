"""What autograd keeps for backward, measured: the ground truth the activation model is checked
against (per block in tests/test_planning.py, and over a training step of the real job in
tests/distributed/check_planning.py).

`SavedBytes` is a `saved_tensors_hooks` context that records every tensor saved for backward
and counts each storage once (a tensor saved by several ops, or views of one buffer, cost
memory once). Storages of parameters and of tensors the caller names as `exclude` (inputs
shared by many blocks, such as the conditioning and text tokens) are not counted.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import nn


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self, module: nn.Module | None = None, exclude: Iterable[torch.Tensor] = ()):
        self.storages: dict[int, tuple[int, torch.dtype, tuple]] = {}
        skip = [p for p in module.parameters()] if module is not None else []
        self._skip = {t.untyped_storage().data_ptr() for t in [*skip, *exclude]}
        super().__init__(self._pack, lambda x: x)

    def __enter__(self) -> "SavedBytes":
        super().__enter__()
        return self

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._skip and storage.nbytes():
            self.storages[key] = (storage.nbytes(), tensor.dtype, tuple(tensor.shape))
        return tensor

    @property
    def total(self) -> int:
        return sum(n for n, _, _ in self.storages.values())

    def by_dtype(self) -> dict[torch.dtype, int]:
        out: dict[torch.dtype, int] = defaultdict(int)
        for n, dtype, _ in self.storages.values():
            out[dtype] += n
        return dict(out)
