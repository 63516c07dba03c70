"""Every layout the training job accepts, estimated and ranked.

Candidates vary TP (inside a node), SP, PP, VPP, EP, the ZeRO backend and stage, recompute and
the micro-batch, with SP whenever TP > 1 and gradient reduction overlapped whenever the job
can (PP = 1), unless pinned; each is a copy of the config with those values, and
`ParallelLayout.build` decides whether it exists (so a layout the job refuses, e.g. DeepSpeed
ZeRO-3 today, is never estimated, let alone recommended). `fixed` pins any `parallel.*` key or `train.micro_batch_size`
to the user's value. Layouts over the memory budget are dropped; the rest are ranked by
predicted step time, then memory.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Iterator, Optional

from megatron_ecdit.config import Config, ConfigError
from megatron_ecdit.parallel.layout import ParallelLayout
from megatron_ecdit.planning.estimate import Cluster, Estimate, Run, estimate

BACKENDS = (("megatron", 1), ("megatron", 0), ("deepspeed", 1), ("deepspeed", 2),
            ("deepspeed", 3))
RECOMPUTE = ("none", "moe_only", "full")


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def candidates(cfg: Config, cluster: Cluster, global_batch: int,
               fixed: dict[str, Any]) -> Iterator[tuple[ParallelLayout, Config]]:
    m, moe, world = cfg.model, cfg.moe, cluster.world_size
    options = {
        "tp": _divisors(cluster.gpus_per_node, cluster.gpus_per_node),
        "sp": [False, True],
        "pp": [d for d in _divisors(m.num_layers, 16) if world % d == 0],
        "vpp": [1, 2, 4],
        "ep": [d for d in _divisors(max(moe.num_experts, 1), world)],
        "backend": list(BACKENDS),
        "activation_checkpointing": list(RECOMPUTE),
        "micro_batch_size": [2 ** k for k in range(0, 10)],
        "overlap_grad_reduce": [False, True],
    }
    for key, value in fixed.items():
        options["backend" if key in ("zero", "zero_stage") else key] = [value]
    if "zero" in fixed or "zero_stage" in fixed:
        options["backend"] = [b for b in BACKENDS
                              if fixed.get("zero", b[0]) == b[0]
                              and fixed.get("zero_stage", b[1]) == b[1]]
    keys = list(options)
    for values in itertools.product(*options.values()):
        choice = dict(zip(keys, values))
        if choice["sp"] != (choice["tp"] > 1) and "sp" not in fixed:
            continue  # SP whenever TP > 1: the same traffic, less activation memory
        if choice["overlap_grad_reduce"] != (choice["pp"] == 1) and "overlap_grad_reduce" \
                not in fixed:
            continue  # overlapped wherever the job can: never slower, the same memory
        mbs = choice.pop("micro_batch_size")
        zero, stage = choice.pop("backend")
        dp = world // (choice["tp"] * choice["pp"])
        if dp == 0 or global_batch % (mbs * dp):
            continue
        trial = copy.deepcopy(cfg)
        for key, value in choice.items():
            setattr(trial.parallel, key, value)
        trial.parallel.etp = None
        trial.parallel.zero, trial.parallel.zero_stage = zero, stage
        trial.train.micro_batch_size = mbs
        trial.train.num_microbatches = global_batch // (mbs * dp)
        try:
            yield ParallelLayout.build(trial, world), trial
        except ConfigError:
            continue


def plan(cfg: Config, cluster: Cluster, global_batch: int, *, precision: str = "bf16",
         fixed: dict[str, Any] | None = None) -> tuple[list[Estimate], int]:
    """Estimates of the layouts that fit, best first, and how many were over the budget."""
    fitting, over = [], 0
    for layout, trial in candidates(cfg, cluster, global_batch, fixed or {}):
        est = estimate(trial, layout, cluster,
                       Run(global_batch, trial.train.micro_batch_size, precision))
        if est.fits:
            fitting.append(est)
        else:
            over += 1
    fitting.sort(key=lambda e: (e.step_time, e.memory_total))
    return fitting, over


def overrides(est: Estimate) -> list[str]:
    """The config overrides that select this layout."""
    lay = est.layout
    out = [f"parallel.tp={lay.tp}", f"parallel.sp={str(lay.sp).lower()}", f"parallel.pp={lay.pp}",
           f"parallel.vpp={lay.vpp}", f"parallel.ep={lay.ep}", f"parallel.zero={lay.zero}",
           f"parallel.zero_stage={lay.zero_stage}",
           f"parallel.activation_checkpointing={lay.recompute}",
           f"parallel.overlap_grad_reduce={str(lay.overlap_grad_reduce).lower()}",
           f"train.micro_batch_size={est.run.micro_batch}",
           f"train.num_microbatches={est.num_microbatches}"]
    return out


# Adding GPUs stops paying where the images/s grow by less than this fraction of the GPUs added.
WORTH_IT = 0.5


@dataclasses.dataclass
class SweepRow:
    """The best layout of one cluster size (None when nothing fits) and the scaling from the
    size before: images/s gained over GPUs added (1.0 = linear)."""

    nodes: int
    best: Optional[Estimate]
    fitting: int
    scaling: Optional[float] = None


def sweep(cfg: Config, cluster: Cluster, nodes: list[int], global_batch: int, *,
          precision: str = "bf16", fixed: dict[str, Any] | None = None) -> list[SweepRow]:
    """For one global batch, the best layout at each cluster size (`cluster` with its node
    count replaced), and how its throughput scales from the size before."""
    rows: list[SweepRow] = []
    for n in sorted(nodes):
        fitting, _ = plan(cfg, dataclasses.replace(cluster, nodes=n), global_batch,
                          precision=precision, fixed=fixed)
        row = SweepRow(n, fitting[0] if fitting else None, len(fitting))
        before = next((r for r in reversed(rows) if r.best is not None), None)
        if row.best is not None and before is not None:
            row.scaling = ((row.best.images_per_s / before.best.images_per_s)
                           / (row.best.layout.world_size / before.best.layout.world_size))
        rows.append(row)
    return rows


def where_it_stops_paying(rows: list[SweepRow]) -> str:
    """One sentence: the first size whose GPUs add less than WORTH_IT of their share in
    images/s, and what an image costs at the largest size against the smallest."""
    fit = [r for r in rows if r.best is not None]
    if not fit:
        return "no cluster size of the sweep fits the model"
    first, last = fit[0].best, fit[-1].best
    cost = (f"an image costs {last.gpu_hours_per_million_images:.1f} GPU-hours per million at "
            f"{fit[-1].nodes} nodes against {first.gpu_hours_per_million_images:.1f} at "
            f"{fit[0].nodes} (MFU {100 * last.mfu:.1f}% against {100 * first.mfu:.1f}%)")
    for before, row in zip(fit, fit[1:]):
        if row.scaling < WORTH_IT:
            return (f"adding GPUs stops paying past {before.nodes} nodes: {row.nodes} nodes give "
                    f"{row.best.images_per_s / before.best.images_per_s:.2f}x the images/s for "
                    f"{row.best.layout.world_size / before.best.layout.world_size:.2f}x the GPUs "
                    f"(scaling {row.scaling:.2f} < {WORTH_IT:g}); {cost}")
    worst = min(r.scaling for r in fit[1:]) if len(fit) > 1 else 1.0
    return (f"adding GPUs still pays up to {fit[-1].nodes} nodes, the largest size swept (each "
            f"size gives at least {worst:.2f} of linear scaling in images/s, over {WORTH_IT:g}), "
            f"but {cost}")
