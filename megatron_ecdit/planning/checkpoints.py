"""A layout's checkpoint: its size, the bytes each rank writes and reads, and how long a save,
a load and the preemption warning take (checkpoint/distributed.py writes it this way).

Per parameter a checkpoint holds the weights (2 bytes in bf16, 4 in fp32), the EMA (4) and
the optimizer state: fp32 main weights and two Adam moments (12; the one-process backend keeps
no main copy of fp32 weights: 8). The save is fully parallel: a tensor replicated over data
parallelism is written once, by one of its replicas, spread so that each rank of a
data-parallel group writes about as much; megatron's distributed optimizer writes each rank's
own buffers (dp_reshardable). So a rank writes its sharded share,
    S = P_dense / DP + P_expert / expert-DP   (what ZeRO shards; P: what the rank holds)
times the bytes per parameter, and a resume reads the same. State a rank holds that is
replicated over TP or PP (norms, biases, the embedders of every stage) is written by each TP x
PP domain's optimizer: S counts it once per holder, as the files do. Not counted: the index
(`.metadata`, written by rank 0), the common state and the per-rank data positions (KBs), and
about 1.5 KB of header per stored piece (1-2% of the demo's files, negligible at scale).

Times, at a `Storage`: a node's ranks write through its link (node_gb_s), all of them through
the file system's aggregate rate (aggregate_gb_s); the slower of the two decides. The preemption
warning (`#SBATCH --signal=USR1@N`) must cover the step in progress and a whole save, with half
again as margin and 30 s for the writer to start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_ecdit.parallel.layout import ParallelLayout
from megatron_ecdit.planning.params import ParamCount


@dataclass(frozen=True)
class Storage:
    node_gb_s: float = 4.0  # what one node writes or reads (its NICs to the file system)
    aggregate_gb_s: float = 100.0  # the file system as a whole (a Lustre/GPFS of a large cluster)

    def seconds(self, bytes_per_node: float, total_bytes: float) -> float:
        return max(bytes_per_node / (self.node_gb_s * 1e9),
                   total_bytes / (self.aggregate_gb_s * 1e9))

    def describe(self) -> str:
        return (f"checkpoint storage: {self.node_gb_s:g} GB/s per node, {self.aggregate_gb_s:g} "
                "GB/s for the file system; every rank writes and reads its share at once")


@dataclass(frozen=True)
class CheckpointPlan:
    total_bytes: float  # one checkpoint, every rank's files
    rank_bytes: list[float]  # per pipeline stage: what each of its ranks writes (and reads)
    save_seconds: float
    load_seconds: float
    signal_lead_seconds: int  # for #SBATCH --signal=USR1@N

    @property
    def max_rank_bytes(self) -> float:
        return max(self.rank_bytes)


def bytes_per_param(layout: ParallelLayout, precision: str) -> int:
    weights = 2 if precision == "bf16" else 4
    optimizer = 8 if layout.world_size == 1 and precision == "fp32" else 12
    return weights + 4 + optimizer


def checkpoint_plan(layout: ParallelLayout, stages: list[ParamCount], precision: str,
                    gpus_per_node: int, storage: Storage, step_seconds: float) -> CheckpointPlan:
    """`stages`: the parameters a rank of each pipeline stage holds (planning/params.py)."""
    per_param = bytes_per_param(layout, precision)
    rank_bytes = [per_param * (p.dense / layout.dp + p.expert / layout.expert_dp)
                  for p in stages]
    ranks_per_stage = layout.world_size // layout.pp
    total = ranks_per_stage * sum(rank_bytes)
    # a node's ranks lie in one stage (rank order tp-ep-dp-pp) unless a stage is smaller
    per_node = min(gpus_per_node, layout.world_size) * max(rank_bytes)
    save = storage.seconds(per_node, total)
    lead = math.ceil(1.5 * (step_seconds + save) + 30)
    return CheckpointPlan(total, rank_bytes, save, save, lead)
