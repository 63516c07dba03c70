"""Hangs and lost peers end the run with the "resume me" code, fast, saying why.

`Watchdog` is a daemon thread beside the loop: the loop calls `beat()` as each step finishes
(and around saves and sampling). When `train.hang_timeout_s` passes without one, from the
first step on, it writes every thread's stack to stderr (faulthandler) and exits the process
with 75 at once: a rank stuck in I/O or in a collective whose peer is stopped does not burn
the allocation until the process group's timeout. A rank stopped itself (SIGSTOP) is caught by
its peers' watchdogs, which then stop waiting for it.

`lost_peer` tells a failed collective (a peer that died or timed out: gloo's transport errors,
torch.distributed's DistError family, NCCL's included) from other errors, so that the entry
point exits 75 for it too. Both print a line ending "resume with train.resume=auto", which the
SLURM batch script reads as "requeue" (the latest checkpoint is always a complete one).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

import torch.distributed as dist

EXIT_RESUME = 75  # as pretrain_ecdit.py: stopped early, run again to resume
RESUME_HINT = "resume with train.resume=auto"

# What gloo's transport and torch's process groups say when a peer is gone or too slow.
_PEER_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Timed out",
                  "timed out", "Broken pipe", "Socket Timeout")


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective that failed for want of a peer."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _PEER_MESSAGES)


class Watchdog:
    """Exit 75 when no `beat()` came for `timeout_s` seconds (0: never). Armed by the first
    beat; `close()` disarms it."""

    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self._last = None  # monotonic time of the last beat; None = not armed
        self._done = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="ecdit-watchdog", daemon=True).start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def close(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            last = self._last
            if last is None or time.monotonic() - last < self.timeout_s:
                continue
            print(f"rank {self.rank}: no step finished for {time.monotonic() - last:.0f} s "
                  f"(train.hang_timeout_s={self.timeout_s:g}); every thread's stack follows; "
                  f"exiting with {EXIT_RESUME}, {RESUME_HINT}", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            os._exit(EXIT_RESUME)
