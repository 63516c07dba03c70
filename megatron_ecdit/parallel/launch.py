"""Which process this is: rank discovery under torchrun, under SLURM's srun, or alone.

`discover(environ)` reads the launcher's variables and returns one `Launch`:
  - torchrun (or any launcher that sets them): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT;
  - srun, one task per GPU (NVIDIA's cluster pattern): SLURM_PROCID, SLURM_LOCALID,
    SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), the tasks on this node from
    SLURM_STEP_TASKS_PER_NODE, the master is the first host of SLURM_STEP_NODELIST (or
    SLURM_JOB_NODELIST), and the port is MASTER_PORT if set, else derived from the job id
    (`port_of_job`), so every task of a step computes the same one;
  - neither: one process.
A batch script's own shell also carries SLURM_PROCID and SLURM_NTASKS; only an srun step sets
SLURM_STEP_NUM_TASKS, so a plain `python pretrain_ecdit.py` in the batch script is one process
rather than a rank waiting for peers that never come.

`Launch.export()` writes the torchrun-style variables, so torch.distributed's env:// and the
rest of the code read one convention. `Launch.device_index(visible)` picks this rank's GPU and
refuses a mismatch between the tasks on a node and the GPUs it shows.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, MutableMapping

import hostlist

from megatron_ecdit.config import ConfigError

PORT_BASE, PORT_SPAN = 20000, 20000


class LaunchError(ConfigError):
    """The launcher's variables do not describe a consistent world."""


def port_of_job(job_id: str) -> int:
    """A port every task of a job derives alike: 20000 + job id mod 20000."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def _tasks_on_node(spec: str, node: int) -> int:
    """SLURM's tasks-per-node notation ("4(x2),3") -> the count on node index `node`."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise LaunchError(f"cannot read SLURM tasks per node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    if node >= len(counts):
        raise LaunchError(f"SLURM_NODEID={node} is beyond SLURM tasks per node {spec!r}")
    return counts[node]


@dataclass(frozen=True)
class Launch:
    launcher: str  # "torchrun", "slurm" or "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    def export(self, environ: MutableMapping[str, str]) -> None:
        environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                       LOCAL_RANK=str(self.local_rank),
                       LOCAL_WORLD_SIZE=str(self.local_world_size),
                       MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))

    def device_index(self, visible: int) -> int:
        """This rank's GPU among the `visible` ones: one per local rank, or the single GPU a
        task was bound to (`--gpus-per-task=1`)."""
        if visible == self.local_world_size:
            return self.local_rank
        if visible == 1:
            return 0
        raise LaunchError(
            f"{self.local_world_size} ranks run on this node but it shows {visible} GPUs: start "
            f"one task per GPU (e.g. srun --ntasks-per-node={visible}), or bind one GPU to "
            "each task (--gpus-per-task=1)")


def discover(environ: Mapping[str, str] = os.environ) -> Launch:
    if "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
        return Launch("torchrun", int(environ.get("RANK", 0)), world,
                      int(environ.get("LOCAL_RANK", 0)), local_world,
                      environ.get("MASTER_ADDR", "127.0.0.1"),
                      int(environ.get("MASTER_PORT", 29500)))
    if "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ:
        return _from_slurm(environ)
    return Launch("single", 0, 1, 0, 1, environ.get("MASTER_ADDR", "127.0.0.1"),
                  int(environ.get("MASTER_PORT", 0)))


def _from_slurm(environ: Mapping[str, str]) -> Launch:
    def need(name: str) -> str:
        if name not in environ:
            raise LaunchError(f"running under srun but {name} is not set")
        return environ[name]

    world = int(environ.get("SLURM_STEP_NUM_TASKS") or need("SLURM_NTASKS"))
    rank, local_rank = int(need("SLURM_PROCID")), int(need("SLURM_LOCALID"))
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or need("SLURM_TASKS_PER_NODE")
    local_world = _tasks_on_node(spec, int(environ.get("SLURM_NODEID", 0)))
    nodes = environ.get("SLURM_STEP_NODELIST") or need("SLURM_JOB_NODELIST")
    try:
        master = hostlist.expand_hostlist(nodes)[0]
    except (hostlist.BadHostlist, IndexError) as err:
        raise LaunchError(f"cannot read the SLURM node list {nodes!r}: {err}") from None
    port = int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else \
        port_of_job(need("SLURM_JOB_ID"))
    if not (0 <= rank < world and 0 <= local_rank < local_world):
        raise LaunchError(f"SLURM rank {rank} / local rank {local_rank} do not fit {world} "
                          f"tasks ({local_world} on this node)")
    return Launch("slurm", rank, world, local_rank, local_world, master, port)
