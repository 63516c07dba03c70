"""Stopping cleanly: on SIGTERM, SIGUSR1 (SLURM's pre-timeout signal) or after a wall-clock
duration, every rank saves at the same step boundary and the job exits 75 ("resume me",
pretrain_ecdit.py).

A signal reaches the ranks at different moments (or only some of them), so the decision is
taken collectively: each step, `should_stop()` all-reduces a flag (MAX) over the world.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, exit_duration_minutes: float = 0.0):
        self.deadline = (time.monotonic() + 60.0 * exit_duration_minutes
                         if exit_duration_minutes > 0 else None)
        self.received: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self) -> Optional[str]:
        """Collective: the reason to stop now, the same on every rank, or None."""
        local = 0
        if self.received is not None:
            local = 2
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            local = 1
        flag = torch.tensor([local], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return {0: None, 1: "time limit reached", 2: "signal received"}[int(flag)]

    def close(self) -> None:
        """Restore the previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
