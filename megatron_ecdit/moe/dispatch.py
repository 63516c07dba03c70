"""Moving the fixed-shape expert buffer between ranks (expert parallelism).

Expert choice fills every expert with exactly N tokens on every rank, so the all-to-all over
the expert-parallel group has equal splits known in advance: no token counts are exchanged
and no host synchronisation is needed (contrast token choice's uneven splits).

    dispatch: (E, N, D) on each of the ep ranks
              -> all_to_all: rank j receives the rows of its E/ep experts from every rank
              -> (E/ep, ep * N, D), local experts see the tokens of all ep ranks
    combine:  the inverse permutation and all_to_all.

megatron-core's differentiable `all_to_all` carries the gradients back. In one process
`LocalDispatcher` (moe/layer.py) is used instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import all_to_all
from torch import nn


class AllToAllDispatcher(nn.Module):
    def __init__(self, ep_group: dist.ProcessGroup):
        super().__init__()
        self.group = ep_group
        self.ep = ep_group.size()

    def dispatch(self, x_END: torch.Tensor) -> torch.Tensor:
        E, N, D = x_END.shape
        received = all_to_all(self.group, x_END.reshape(E * N, D).contiguous())
        # Rows arrive grouped by source rank: (ep, E_local, N, D) -> (E_local, ep * N, D).
        return received.view(self.ep, E // self.ep, N, D).transpose(0, 1).reshape(
            E // self.ep, self.ep * N, D)

    def combine(self, y_local: torch.Tensor) -> torch.Tensor:
        E_local, epN, D = y_local.shape
        N = epN // self.ep
        outgoing = y_local.view(E_local, self.ep, N, D).transpose(0, 1).reshape(-1, D)
        return all_to_all(self.group, outgoing.contiguous()).view(E_local * self.ep, N, D)
