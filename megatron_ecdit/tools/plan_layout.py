"""Plan a parallel layout: every layout the job accepts, its memory per GPU, step time and MFU.

    ecdit-plan --config examples/configs/m_64e.yaml --nodes 64 --gpus-per-node 8 --gpu-memory-gib 80
    ecdit-plan --size M-64E --nodes 8 --ep 64          # a paper size; pin any degree
    ecdit-plan ... --json                              # for scripts
    ecdit-plan --size M-64E --sweep-nodes 8,16,32,64   # how many GPUs are worth using

Prints the best layouts that fit as a table, the memory breakdown of the first, the config
overrides and sbatch line that select it, and the assumptions behind the numbers
(megatron_ecdit/planning/). Exit code 2 when no layout fits. With --sweep-nodes, the best
layout of each cluster size for the one global batch instead: step time, MFU, images/s,
GPU-hours per million images and how images/s scale with the GPUs added, then where adding GPUs
stops paying.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from megatron_ecdit.config import PAPER_SIZES, Config, ConfigError, load_config, paper_model
from megatron_ecdit.planning.checkpoints import Storage
from megatron_ecdit.planning.estimate import GiB, Cluster, Estimate
from megatron_ecdit.planning.search import (SweepRow, overrides, plan, sweep,
                                            where_it_stops_paying)

FIXED = {"tp": int, "pp": int, "vpp": int, "ep": int, "zero": str, "zero_stage": int,
         "recompute": str, "micro_batch": int}


def paper_config(name: str) -> Config:
    """'M-64E', 'XL-8E', 'XXL' (dense): Table 1's model with the paper's recipe where it
    matters for planning (MaskDiT ratio 0.5, i.e. 128 of 256 tokens; 120 text tokens)."""
    match = re.fullmatch(r"(\w+?)(?:-(\d+)E)?", name)
    if match is None or match.group(1) not in PAPER_SIZES:
        raise ConfigError(f"unknown size {name!r}: use one of {', '.join(PAPER_SIZES)}, "
                          "optionally with -<experts>E (e.g. M-64E)")
    cfg = Config()
    cfg.model, cfg.moe = paper_model(match.group(1), int(match.group(2) or 0))
    cfg.diffusion.mask_ratio = 0.5
    cfg.text_encoder.max_length = 120
    cfg.train.precision = "bf16"
    return cfg.validate()


def _row(rank: int, e: Estimate) -> str:
    lay = e.layout
    return (f"{rank:>3} {lay.tp:>3} {'y' if lay.sp else '-':>3} {lay.pp:>3} {lay.vpp:>4} "
            f"{lay.ep:>4} {lay.dp:>5} {lay.expert_dp:>4} {lay.zero[:2]}-{lay.zero_stage:<3}"
            f"{lay.recompute:>9} {e.run.micro_batch:>4}x{e.num_microbatches:<4}"
            f"{e.memory_total / GiB:>8.1f} {e.step_time:>7.3f} {100 * e.mfu:>5.1f}%"
            f" {e.expert_gemm_rows:>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a YAML config (its model, MoE, masking, text length)")
    source.add_argument("--size", help="a paper size instead: XL, XXL, 3XL, M, with -<E>E")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--nodes", type=int)
    size.add_argument("--sweep-nodes", type=_node_counts, metavar="N,N,...",
                      help="the best layout at each of these cluster sizes")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="peak dense bf16")
    parser.add_argument("--internode-gb-s", type=float, default=Cluster.internode_gb_s,
                        help="bandwidth per GPU between nodes")
    parser.add_argument("--storage-gb-s", type=_storage, default=Storage(),
                        metavar="NODE[,AGGREGATE]",
                        help="checkpoint storage: GB/s per node, and of the whole file system "
                             f"(default {Storage.node_gb_s:g},{Storage.aggregate_gb_s:g})")
    parser.add_argument("--global-batch", type=int, default=4096, help="images per step")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="default: the config's train.precision (auto: bf16)")
    for name, kind in FIXED.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help="fix this choice")
    parser.add_argument("--top", type=int, default=10, help="rows to print")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    try:
        cfg = (load_config(args.config, allow_missing=True) if args.config
               else paper_config(args.size))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    cluster = Cluster(args.nodes or args.sweep_nodes[0], args.gpus_per_node, args.gpu_memory_gib, args.gpu_tflops,
                      internode_gb_s=args.internode_gb_s, storage=args.storage_gb_s)
    names = {"recompute": "activation_checkpointing", "micro_batch": "micro_batch_size"}
    fixed = {names.get(k, k): getattr(args, k) for k in FIXED if getattr(args, k) is not None}
    if "tp" in fixed and "sp" not in fixed:
        fixed["sp"] = fixed["tp"] > 1
    precision = args.precision or cfg.train.precision
    if precision == "auto":  # the planner's GPUs have native bf16
        precision = "bf16"
    if args.sweep_nodes:
        rows = sweep(cfg, cluster, args.sweep_nodes, args.global_batch, precision=precision,
                     fixed=fixed)
        _print_sweep(rows, cluster, args, precision)
        return 0 if any(r.best is not None for r in rows) else 2
    estimates, over = plan(cfg, cluster, args.global_batch, precision=precision, fixed=fixed)
    if args.json:
        print(json.dumps({"cluster": dataclasses.asdict(cluster), "over_budget": over,
                          "assumptions": cluster.assumptions(precision),
                          "layouts": [_as_json(e) for e in estimates[:args.top]]}, indent=1))
        return 0 if estimates else 2
    print(f"{len(estimates)} layouts fit in {cluster.gpu_memory_gib:g} GiB, {over} do not "
          f"(global batch {args.global_batch}, {precision})")
    if not estimates:
        return 2
    print(f"{'#':>3} {'TP':>3} {'SP':>3} {'PP':>3} {'VPP':>4} {'EP':>4} {'DP':>5} {'EDP':>4} "
          f"{'ZeRO':<6}{'recompute':>9} {'mb x n':<9}{'GiB/GPU':>8} {'step s':>7} {'MFU':>6}"
          f" {'tok/exp':>7}")
    for rank, e in enumerate(estimates[:args.top], 1):
        print(_row(rank, e))
    best = estimates[0]
    print("\nbest layout, memory per GPU (GiB, worst pipeline stage):")
    print("  " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in best.memory.items())
          + f"; total {best.memory_total / GiB:.2f}")
    print("  step time (s), communication as exposed: "
          + ", ".join(f"{k} {v:.3f}" for k, v in best.times.items()))
    if best.hidden:
        print("  hidden behind compute (s): "
              + ", ".join(f"{k} {v:.3f}" for k, v in best.hidden.items()))
    print("  exposed, and why:")
    for kind, why in best.why_exposed.items():
        print(f"    {kind} {best.times[kind]:.3f} s: {why}")
    print("  sent per GPU per step (GB): "
          + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in best.comm.items()))
    print(f"  parameters per GPU: {best.params.dense / 1e9:.3f}B dense + "
          f"{best.params.expert / 1e9:.3f}B expert; {best.expert_gemm_rows} tokens per expert "
          "per GEMM")
    ck = best.checkpoint
    print(f"  checkpoint: {ck.total_bytes / 1e9:.1f} GB; each rank writes and reads "
          + " / ".join(f"{b / 1e9:.2f}" for b in ck.rank_bytes)
          + f" GB (per pipeline stage); save {ck.save_seconds:.0f} s, load "
          f"{ck.load_seconds:.0f} s; preemption warning {ck.signal_lead_seconds} s")
    over_rides = " ".join(overrides(best))
    print(f"\noverrides: {over_rides}")
    config = args.config or "CONFIG.yaml"
    lead = ck.signal_lead_seconds
    print(f"ECDIT_SIGNAL_LEAD={lead} sbatch --nodes={args.nodes} "
          f"--gpus-per-node={args.gpus_per_node} --ntasks-per-node={args.gpus_per_node} "
          f"--signal=USR1@{lead} examples/slurm/pretrain_ecdit.sbatch {config} {over_rides}")
    print("\nassumptions:\n"
          + "\n".join(f"  - {line}" for line in cluster.assumptions(precision)))
    return 0


def _short(e: Estimate) -> str:
    lay = e.layout
    return (f"TP{lay.tp}{'+SP' if lay.sp else ''} PP{lay.pp} EP{lay.ep} DP{lay.dp} "
            f"{lay.zero[:2]}-{lay.zero_stage}{' ovl' if lay.overlap_grad_reduce else ''} "
            f"{lay.recompute} {e.run.micro_batch}x{e.num_microbatches}")


def _print_sweep(rows: list[SweepRow], cluster: Cluster, args, precision: str) -> None:
    if args.json:
        print(json.dumps({"cluster": dataclasses.asdict(cluster) | {"nodes": args.sweep_nodes},
                          "assumptions": cluster.assumptions(precision)[1:],
                          "sizes": [{"nodes": r.nodes, "layouts_that_fit": r.fitting,
                                     "scaling": r.scaling,
                                     "best": None if r.best is None else
                                     _as_json(r.best) | {
                                         "images_per_s": r.best.images_per_s,
                                         "gpu_hours_per_million_images":
                                             r.best.gpu_hours_per_million_images}}
                                    for r in rows],
                          "verdict": where_it_stops_paying(rows)}, indent=1))
        return
    print(f"best layout per cluster size (global batch {args.global_batch}, {precision}; "
          "scaling: images/s gained over GPUs added, 1.00 = linear)")
    print(f"{'nodes':>5} {'GPUs':>5}  {'layout':<40} {'GiB/GPU':>7} {'step s':>7} {'MFU':>6} "
          f"{'images/s':>9} {'GPU-h/M img':>11} {'scaling':>7}")
    for r in rows:
        gpus = r.nodes * cluster.gpus_per_node
        if r.best is None:
            print(f"{r.nodes:>5} {gpus:>5}  {'(no layout fits)':<40}")
            continue
        e = r.best
        scaling = "" if r.scaling is None else f"{r.scaling:.2f}"
        print(f"{r.nodes:>5} {gpus:>5}  {_short(e):<40} {e.memory_total / GiB:>7.1f} "
              f"{e.step_time:>7.3f} {100 * e.mfu:>5.1f}% {e.images_per_s:>9.0f} "
              f"{e.gpu_hours_per_million_images:>11.1f} {scaling:>7}")
    print(f"\n{where_it_stops_paying(rows)}")
    print("\nassumptions:\n"
          + "\n".join(f"  - {line}" for line in cluster.assumptions(precision)[1:]))


def _as_json(e: Estimate) -> dict:
    return {"layout": dataclasses.asdict(e.layout), "dp": e.layout.dp,
            "expert_dp": e.layout.expert_dp, "micro_batch": e.run.micro_batch,
            "num_microbatches": e.num_microbatches, "overrides": overrides(e),
            "memory_bytes": e.memory, "memory_total_bytes": e.memory_total,
            "params": {"dense": e.params.dense, "expert": e.params.expert},
            "flops_per_step": e.flops, "model_flops_per_step": e.model_flops,
            "comm_bytes_per_gpu": e.comm, "times_s": e.times, "step_time_s": e.step_time,
            "hidden_s": e.hidden, "why_exposed": e.why_exposed,
            "mfu": e.mfu,
            "tokens_per_expert_gemm": e.expert_gemm_rows,
            "checkpoint": dataclasses.asdict(e.checkpoint)}


def _node_counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected node counts like 8,16,32, got {text!r}")
    if min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"expected distinct node counts >= 1, got {text!r}")
    return sorted(counts)


def _storage(text: str) -> Storage:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NODE[,AGGREGATE] in GB/s, got {text!r}")
    if not 1 <= len(values) <= 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected NODE[,AGGREGATE] in GB/s > 0, got {text!r}")
    return Storage(*values)


if __name__ == "__main__":
    sys.exit(main())
