"""Non-finite steps: skipped before they reach the weights, counted, and a run that keeps
producing them stopped.

Each micro-batch's loss goes through `guard`, so that a non-finite loss makes the gradients
non-finite as well (otherwise it multiplies by exactly 1, and reads nothing). Every optimizer
backend checks the global gradient norm it clips with before it updates and skips the update
when the norm is not finite: the norm megatron-core's optimizer computes, DeepSpeed's overflow
check on its own norm, torch's clipping norm in one process. As that norm is reduced over every
rank, every rank skips the same steps. `SkippedSteps` then keeps the loop's side: no EMA update,
the step counted and logged with the micro-batches whose loss was not finite, and after
`train.max_skipped_steps` skipped steps in a row an error that stops the run (the checkpoints
written so far, all of finite weights, stay as they are: `latest` is the last one).

A skipped step consumes its micro-batches and advances the learning-rate schedule like any
other; the optimizer's own step count does not advance, so checkpoints record how many steps
were skipped and a resume restores the count of updates actually applied.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist


class SkippedStepsError(RuntimeError):
    """Too many non-finite steps in a row (raised alike on every rank)."""


def guard(loss: torch.Tensor) -> torch.Tensor:
    """`loss`, whose gradient becomes NaN when its value is not finite (a NaN loss can still
    give finite gradients, e.g. through a masked or detached path)."""
    factor = torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)
    return loss * factor.to(loss.dtype)


def injected(spec: list[str], step: int) -> list[int]:
    """The micro-batches of `step` that `train.inject_nonfinite` ("STEP:MICRO" entries) names."""
    found = []
    for entry in spec:
        at, micro = entry.split(":")
        if int(at) == step:
            found.append(int(micro))
    return found


def parse_injections(spec: list[str], num_microbatches: int) -> None:
    """Check `train.inject_nonfinite` before training: raises ValueError naming the entry."""
    for entry in spec:
        parts = str(entry).split(":")
        if (len(parts) != 2 or not all(p.strip().isdigit() for p in parts)
                or int(parts[0]) < 1 or int(parts[1]) >= num_microbatches):
            raise ValueError(f"train.inject_nonfinite entries are 'STEP:MICRO' with STEP >= 1 "
                             f"and MICRO < train.num_microbatches={num_microbatches}, "
                             f"got {entry!r}")


class SkippedSteps:
    """The loop's count of skipped steps: `total` since the run began (checkpointed), and the
    current run of them in a row, which may not exceed `limit`."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.in_a_row = limit, total, 0

    def applied(self) -> None:
        self.in_a_row = 0

    def skipped(self, step: int, micro_losses: Optional[torch.Tensor], num_microbatches: int,
                device: torch.device) -> str:
        """Count a skipped step (collective: every rank calls it for the same steps); returns
        the line to log, or raises SkippedStepsError once more than `limit` are in a row."""
        self.total += 1
        self.in_a_row += 1
        micro = nonfinite_microbatches(micro_losses, num_microbatches, device)
        what = (f"non-finite loss in micro-batch {', '.join(map(str, micro))}" if micro
                else "non-finite gradients (the losses are finite)")
        line = (f"step {step} skipped: {what}; {self.in_a_row} in a row, {self.total} in all")
        if self.in_a_row > self.limit:
            raise SkippedStepsError(f"{self.in_a_row} non-finite steps in a row, the last at "
                                    f"step {step} ({what}), more than "
                                    f"train.max_skipped_steps={self.limit}")
        return line


def nonfinite_microbatches(micro_losses: Optional[torch.Tensor], n: int,
                           device: torch.device) -> list[int]:
    """The micro-batch indices whose loss was not finite on any rank (collective). Ranks
    without losses (pipeline stages before the last) pass None."""
    flags = torch.zeros(n, dtype=torch.int32, device=device)
    if micro_losses is not None:
        flags = (~torch.isfinite(micro_losses.detach())).to(device, torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [i for i, flag in enumerate(flags.tolist()) if flag]
