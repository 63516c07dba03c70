"""Every layout the training job accepts, estimated and ranked.

Candidates vary TP (inside a node), SP, PP, VPP, EP, the ZeRO backend and stage, recompute and
the micro-batch; each is a copy of the config with those values, and `ParallelLayout.build`
decides whether it exists (so a layout the job refuses, e.g. DeepSpeed ZeRO-3 today, is never
estimated, let alone recommended). `fixed` pins any `parallel.*` key or `train.micro_batch_size`
to the user's value. Layouts over the memory budget are dropped; the rest are ranked by
predicted step time, then memory.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Iterator

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
           f"train.micro_batch_size={est.run.micro_batch}",
           f"train.num_microbatches={est.num_microbatches}"]
    return out
