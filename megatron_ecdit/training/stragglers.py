"""Which rank is slow: each rank's own work in a step, compared across ranks on log steps.

A rank's own work is the forward and backward of its micro-batches, timed from the start of the
step to the optimizer step. The optimizer step's reductions are where ranks wait for the
slowest, after their timers stopped, so the slowest time belongs to the rank that held the
others up. (Where ranks also wait inside backward, under overlapped gradient reduction or
pipelining, the slowest rank still shows; the others' times then include some waiting.)

On a GPU the times come from CUDA events, read on log steps once the step's loss has been read
(which waits for the step anyway); elsewhere from the host clock. One all-gather of one number
per rank on log steps; the host names are gathered once.
"""

from __future__ import annotations

import socket
import time

import torch
import torch.distributed as dist


class StepTimes:
    """`start()` and `stop()` around a rank's own work; `report()` on log steps (collective)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.hosts: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(self.hosts, socket.gethostname())
        self.cuda = device.type == "cuda"
        self._begin = self._end = None

    def start(self) -> None:
        self._begin = self._stamp()

    def stop(self) -> None:
        self._end = self._stamp()

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self) -> float:
        """This rank's time between start() and stop()."""
        if self.cuda:
            return self._begin.elapsed_time(self._end) / 1000.0
        return self._end - self._begin

    def report(self) -> dict[str, object]:
        """The slowest and fastest ranks of the last step: rank, host and seconds each."""
        every = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=self.device)
        every[dist.get_rank()] = self.seconds()
        dist.all_reduce(every)  # a gather of one number per rank, on every backend
        times = every.tolist()
        slowest = max(range(len(times)), key=times.__getitem__)
        fastest = min(range(len(times)), key=times.__getitem__)
        return {"slowest_rank": slowest, "slowest_host": self.hosts[slowest],
                "slowest_s": times[slowest], "fastest_rank": fastest,
                "fastest_host": self.hosts[fastest], "fastest_s": times[fastest]}


def describe(report: dict[str, object]) -> str:
    """The log line's part: "slowest rank 3 (node2) 0.52 s, fastest rank 0 (node1) 0.31 s"."""
    return (f"slowest rank {report['slowest_rank']} ({report['slowest_host']}) "
            f"{report['slowest_s']:.2f} s, fastest rank {report['fastest_rank']} "
            f"({report['fastest_host']}) {report['fastest_s']:.2f} s")


def placement(hosts: list[str]) -> str:
    """Which ranks each host runs: "ecn1: ranks 0, 1; ecn2: ranks 2, 3"."""
    ranks: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks.setdefault(host, []).append(rank)
    return "; ".join(f"{host}: ranks {', '.join(map(str, r))}" for host, r in ranks.items())
