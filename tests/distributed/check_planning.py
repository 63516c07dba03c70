"""Run under torchrun with 4 processes: the planner and activation recompute against the code
under gloo. Prints one `RESULT {json}` line per check on rank 0, with every rank's numbers.

    torchrun --nproc-per-node 4 tests/distributed/check_planning.py JOB_JSON

  recompute     gradients with `full` and `moe_only` recompute against none, per rank (local
                gradients, before any data-parallel reduction): TP2+SP x EP2, one
                forward/backward; PP2 x DP2, megatron-core's 1F1B schedule over 2 micro-batches
                (gradients read from DDP's buffers)
  activations   bytes autograd saves per block (planning/measure.SavedBytes) against
                planning/activations.py, dense and EC blocks, each recompute mode, at TP2+SP,
                EP2 and TP2+SP x EP2
  model_states  megatron-core's distributed optimizer at TP2+SP x EP2, over an fp32 and over a
                bf16 model: the parameters, the fp32 gradient buffer, and the optimizer state
                (Adam moments, and under bf16 the fp32 main-weight shards) per rank against
                the planner's estimate
  job           (JOB_JSON: the demo config and the planner's top layout for it at 4 ranks, as
                overrides) the training Job, built as pretrain_ecdit builds it, trains a few
                steps at that layout; the bytes autograd saves during its first step and its
                model states afterwards, per rank, for the test to hold against the plan
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Light for the helper megatron-core's checkpoint writer spawns (see run_entry_point.py).
if __name__ != "__mp_main__":
    import torch  # noqa: E402
    import torch.distributed as dist  # noqa: E402
    from megatron.core import parallel_state as ps  # noqa: E402

    from megatron_ecdit.checkpoint.consolidated import DTYPES  # noqa: E402
    from megatron_ecdit.config import load_config  # noqa: E402
    from megatron_ecdit.diffusion.rectified_flow import flow_matching_loss  # noqa: E402
    from megatron_ecdit.models.ecdit import ECDiT, ECDiTBlock, stage_chunks  # noqa: E402
    from megatron_ecdit.parallel.backends.megatron_ddp import MegatronZeRO  # noqa: E402
    from megatron_ecdit.parallel.layout import ParallelLayout  # noqa: E402
    from megatron_ecdit.parallel.pipeline import PipelineRunner  # noqa: E402
    from megatron_ecdit.parallel.setup import initialize_parallel, world_size  # noqa: E402
    from megatron_ecdit.parallel.sharding import initialize  # noqa: E402
    from megatron_ecdit.planning import activations as act  # noqa: E402
    from megatron_ecdit.planning.estimate import Cluster, Run, estimate  # noqa: E402
    from megatron_ecdit.planning.measure import SavedBytes  # noqa: E402
    from megatron_ecdit.training.optim import learning_rate  # noqa: E402
    from megatron_ecdit.training.trainer import Job  # noqa: E402

MODEL = ["model.hidden_size=64", "model.num_layers=4", "model.num_heads=4",
         "model.num_kv_heads=2", "model.input_size=16", "model.patch_size=2",
         "model.text_dim=24", "moe.num_experts=4"]
MICRO_BATCH, TEXT = 2, 5
RECOMPUTE = ("none", "full", "moe_only")


def setup(spec: dict):
    """(cfg, layout, ctx) for parallel degrees {"tp": 2, ...} and other dotted keys."""
    cfg = load_config(overrides=MODEL + [f"{k if '.' in k else 'parallel.' + k}={v}"
                                         for k, v in spec.items()])
    layout = ParallelLayout.build(cfg, world_size())
    return cfg, layout, initialize_parallel(layout)


def perturbed(chunks: list, ctx) -> list:
    """The seed's weights plus noise, so adaLN-Zero and zero outputs leave no gradient zero
    (drawn in parameter order: the same on every rank of a TP or EP group, so their replicated
    parameters stay identical)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for chunk in chunks:
            initialize(chunk, 0, ctx)
            for p in chunk.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return chunks


def batch(cfg, n: int, seed: int):
    """(x_t, t, text, mask, keep), target: one micro-batch, a function of the seed only (the
    callers seed by data-parallel rank, so TP and PP peers see the same batch)."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x = torch.randn(n, m.in_channels, m.input_size, m.input_size, generator=g)
    mask = torch.ones(n, TEXT, dtype=torch.bool)
    mask[::2, 3:] = False
    return ((x, torch.rand(n, generator=g), torch.randn(n, TEXT, m.text_dim, generator=g), mask,
             None), torch.randn(x.shape, generator=g))


def max_diff(grads: dict, reference: dict) -> tuple[float, str]:
    return max(((grads[n] - g).abs().max().item(), n) for n, g in reference.items())


def recompute_tp_ep() -> dict:
    """TP2+SP x EP2 (x DP2): each rank's gradients of one forward/backward, by recompute mode."""
    grads = {}
    for mode in RECOMPUTE:
        cfg, layout, ctx = setup({"tp": 2, "sp": "true", "ep": 2,
                                  "activation_checkpointing": mode})
        model = perturbed([ECDiT(cfg.model, cfg.moe, ctx)], ctx)[0]
        inputs, target = batch(cfg, MICRO_BATCH, seed=ps.get_data_parallel_rank())
        flow_matching_loss(model(*inputs).prediction, target).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"layout": layout.describe(), "grad_abs_max": grad_scale(grads["none"]),
            **{mode: max_diff(grads[mode], grads["none"]) for mode in RECOMPUTE[1:]}}


def recompute_pp() -> dict:
    """PP2 x DP2: each rank's gradients (DDP's buffers, before reduction) after megatron-core's
    1F1B schedule over 2 micro-batches, by recompute mode."""
    grads = {}
    for mode in RECOMPUTE:
        cfg, layout, ctx = setup({"pp": 2, "train.num_microbatches": 2,
                                  "activation_checkpointing": mode})
        chunks = perturbed(stage_chunks(cfg.model, cfg.moe, ctx, 2, 1,
                                        ps.get_pipeline_model_parallel_rank()), ctx)
        backend = MegatronZeRO(chunks, cfg.model, cfg.moe, cfg.optim, ctx, layout)
        runner = PipelineRunner(backend.modules, cfg.model.num_patches)
        backend.zero_grad()
        micro = [batch(cfg, MICRO_BATCH, seed=10 * ps.get_data_parallel_rank() + i)
                 for i in range(2)]
        runner.train_step(micro, lambda pred, tgt: flow_matching_loss(pred, tgt))
        grads[mode] = {n: p.main_grad.clone() for n, p in chunks[0].named_parameters()}
    return {"layout": layout.describe(), "grad_abs_max": grad_scale(grads["none"]),
            **{mode: max_diff(grads[mode], grads["none"]) for mode in RECOMPUTE[1:]}}


def grad_scale(grads: dict) -> float:
    return max(g.abs().max().item() for g in grads.values())


def activations(spec: dict) -> dict:
    """Planned / measured bytes of one block's saves, dense and EC, by recompute mode."""
    cfg, layout, ctx = setup(spec)
    m, B, L = cfg.model, 4, 8
    S = m.num_patches
    shape = act.Shape(B, S, L, layout.tp, layout.sp, layout.etp)
    ratios = {}
    for kind, factor in (("dense", None), ("ec", cfg.moe.capacity_factor)):
        for mode in RECOMPUTE:
            torch.manual_seed(0)
            block = ECDiTBlock(dataclasses.replace(ctx, recompute=mode), m, cfg.moe, factor)
            x = torch.randn(S // shape.seq_div, B, m.hidden_size, requires_grad=True)
            c = torch.randn(B, m.cond_size, requires_grad=True)
            text = torch.randn(L, B, m.hidden_size, requires_grad=True)
            with SavedBytes(block, exclude=[c, text]) as saved:
                block(x, c, text, torch.ones(B, L))
            planned = act.block_bytes(m, cfg.moe, shape, factor, mode)
            ratios[f"{kind}-{mode}"] = planned / saved.total
    return {"layout": layout.describe(), "ratios": ratios}


def state_bytes(backend: MegatronZeRO) -> dict[str, int]:
    """What megatron-core holds per rank: the parameters, the fp32 gradient buffers (dense and
    expert), and the optimizer state of this rank's shard: the Adam moments and the fp32 main
    weights the optimizer steps, where they are copies (of bf16 parameters; fp32 main weights
    are views of the parameters)."""
    params = [p for module in backend.modules for p in module.parameters()]
    model_storages = {p.untyped_storage().data_ptr() for p in params}
    grads = sum(buffer.grad_data.nbytes for module in backend.modules
                for buffer in module.buffers + module.expert_parallel_buffers)
    optimizer_state = 0
    for optimizer in backend._optimizers():
        for group in optimizer.optimizer.param_groups:
            optimizer_state += sum(main.nbytes for main in group["params"]
                                   if main.untyped_storage().data_ptr() not in model_storages)
        for state in optimizer.optimizer.state.values():
            optimizer_state += state["exp_avg"].nbytes + state["exp_avg_sq"].nbytes
    return {"weights": sum(p.nbytes for p in params), "gradients": grads,
            "optimizer": optimizer_state}


def model_states(precision: str) -> dict:
    """Megatron-core's distributed optimizer at TP2+SP x EP2 after one step, against the
    planner's weights, gradients and optimizer bytes for the same layout and precision (the
    model cast as the training job casts it)."""
    cfg, layout, ctx = setup({"tp": 2, "sp": "true", "ep": 2})
    model = perturbed([ECDiT(cfg.model, cfg.moe, ctx)], ctx)[0].to(DTYPES[precision])
    backend = MegatronZeRO(model, cfg.model, cfg.moe, cfg.optim, ctx, layout)
    backend.zero_grad()
    inputs, target = batch(cfg, MICRO_BATCH, seed=0)
    backend.backward(flow_matching_loss(backend.module(*inputs).prediction, target))
    backend.step(cfg.optim.lr)
    planned = estimate(cfg, layout, Cluster(1, world_size()),
                       Run(MICRO_BATCH * layout.dp, MICRO_BATCH, precision)).memory
    real = state_bytes(backend)
    return {"layout": layout.describe(), "real": real,
            "planned": {k: planned[k] for k in real}}


def job(spec: dict) -> dict:
    """The planner's top layout for the demo: a Job built from the config and overrides as
    pretrain_ecdit builds it, trained `train.steps` steps the way its loop steps (zero_grad,
    forward_backward, step); the first step's forward/backward runs under SavedBytes, and the
    model states are read after the last."""
    cfg = load_config(spec["config"], spec["overrides"])
    job = Job(cfg)
    batches = job.batches()
    losses, saved = [], SavedBytes(job.model)
    for step in range(1, cfg.train.steps + 1):
        micro = [next(batches) for _ in range(cfg.train.num_microbatches)]
        job.backend.zero_grad()
        with saved if step == 1 else contextlib.nullcontext():
            loss, _, _ = job.forward_backward(micro, step)
        job.backend.step(learning_rate(cfg.optim, cfg.train.steps, step - 1))
        losses.append(loss.item())
    return {"layout": job.layout.describe(), "losses": losses, "activations": saved.total,
            **state_bytes(job.backend)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    world_size()
    checks = {"recompute TP2+SP x EP2": recompute_tp_ep, "recompute PP2": recompute_pp,
              "activations TP2+SP": lambda: activations({"tp": 2, "sp": "true"}),
              "activations EP2": lambda: activations({"ep": 2}),
              "activations TP2+SP x EP2": lambda: activations({"tp": 2, "sp": "true", "ep": 2}),
              "model states fp32 TP2+SP x EP2": lambda: model_states("fp32"),
              "model states bf16 TP2+SP x EP2": lambda: model_states("bf16"),
              "job": lambda: job(spec)}
    for name, check in checks.items():
        start = time.perf_counter()
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, check())
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps({"check": name, "ranks": ranks,
                                          "seconds": time.perf_counter() - start}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
