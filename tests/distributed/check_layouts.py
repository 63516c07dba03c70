"""Run under torchrun: for each layout, a parallel model's loss and gradients must equal a
single-process model's on the same weights and global batch. Prints one JSON line per layout
(on rank 0) with the largest relative errors; exits non-zero on any exception.

    torchrun --nproc-per-node 4 tests/distributed/check_layouts.py '[{"tp": 2}, {"ep": 2}]'
"""

import contextlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from megatron_ecdit.config import load_config  # noqa: E402
from megatron_ecdit.diffusion.rectified_flow import add_noise, flow_matching_loss  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from megatron_ecdit.models.ecdit import ECDiT, stage_layers  # noqa: E402
from megatron_ecdit.layers.tensor_parallel import ParallelContext  # noqa: E402
from megatron_ecdit.parallel.layout import ParallelLayout  # noqa: E402
from megatron_ecdit.parallel.setup import initialize_parallel, world_size  # noqa: E402
from megatron_ecdit.parallel.sharding import gather_full, load_full_state  # noqa: E402
from megatron_ecdit.parallel.backends.deepspeed_zero import DeepSpeedZeRO  # noqa: E402
from megatron_ecdit.parallel.backends.megatron_ddp import MegatronZeRO  # noqa: E402

MODEL = ["model.hidden_size=64", "model.num_layers=4", "model.num_heads=4",
         "model.num_kv_heads=2", "model.input_size=16", "model.patch_size=2",
         "model.text_dim=24", "moe.num_experts=4"]
MICRO_BATCH = 2


def single_rank_group() -> dist.ProcessGroup:
    """A size-one group per rank, for the reference model (created collectively)."""
    mine = None
    for r in range(dist.get_world_size()):
        group = dist.new_group([r])
        if r == dist.get_rank():
            mine = group
    return mine


def global_batch(n: int, cfg, seed: int = 42):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    x0 = torch.randn(n, m.in_channels, m.input_size, m.input_size, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.rand(n, generator=g)
    text = torch.randn(n, 5, m.text_dim, generator=g)
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[::2, 3:] = False
    x_t, target = add_noise(x0, noise, t)
    return x_t, t, text, mask, target


def loss_of(model, batch):
    x_t, t, text, mask, target = batch
    return flow_matching_loss(model(x_t, t, text, mask).prediction, target)


def reduce_grads(model, ctx, dp: int) -> None:
    """What megatron-core's DDP + finalize_model_grads do: SP-tagged params summed over TP;
    then grads averaged over DP (dense) or expert-DP (experts) with a 1/dp scale."""
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "sequence_parallel", False) and ctx.tp_size > 1:
            dist.all_reduce(p.grad, group=ctx.tp_group)
        p.grad /= dp
        is_expert = getattr(p, "allreduce", True) is False
        group = ps.get_expert_data_parallel_group() if is_expert else ps.get_data_parallel_group()
        dist.all_reduce(p.grad, group=group)


def config_of(spec: dict):
    """A layout spec: parallel degrees ({"tp": 2}) and optionally other dotted config keys."""
    return load_config(overrides=MODEL + [f"{k if '.' in k else 'parallel.' + k}={v}"
                                          for k, v in spec.items()])


def models(spec: dict, ref_group):
    """(cfg, layout, ctx, reference, parallel model) with the same random non-zero weights."""
    cfg = config_of(spec)
    layout = ParallelLayout.build(cfg, world_size())
    ctx = initialize_parallel(layout)
    torch.manual_seed(0)
    reference = ECDiT(cfg.model, cfg.moe, ParallelContext(tp_group=ref_group))
    model = ECDiT(cfg.model, cfg.moe, ctx)
    with torch.no_grad():  # make every zero-initialised weight count
        g = torch.Generator().manual_seed(1)
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        load_full_state(model, dict(reference.named_parameters()), ctx)
    return cfg, layout, ctx, reference, model


def local_slice(batch, layout):
    rank = ps.get_data_parallel_rank()
    return tuple(x[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH] for x in batch)


def check_training(spec: dict, ref_group, steps: int = 3) -> dict:
    """`steps` AdamW steps with grad clipping: megatron DDP + (distributed) optimizer against
    torch.optim.AdamW in one process. Losses per step and parameters after."""
    cfg, layout, ctx, reference, model = models(spec, ref_group)
    cfg.optim.grad_clip = 0.05  # small enough to be active, so clipping is compared too
    backend = (DeepSpeedZeRO(model, cfg.optim, layout, MICRO_BATCH) if layout.zero == "deepspeed"
               else MegatronZeRO(model, cfg.model, cfg.moe, cfg.optim, ctx, layout))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=cfg.optim.lr,
                                betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=0.0)
    loss_errs, norm_errs = [], []  # the gradient norm each backend clips with, too
    for step in range(steps):
        batch = global_batch(layout.dp * MICRO_BATCH, cfg, seed=100 + step)
        ref_opt.zero_grad()
        ref_loss = loss_of(reference, batch)
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.optim.grad_clip)
        ref_opt.step()
        backend.zero_grad()
        loss = loss_of(backend.module, local_slice(batch, layout))
        backend.backward(loss)
        norm = backend.step(cfg.optim.lr)
        norm_errs.append(abs(norm - ref_norm.item()) / ref_norm.item())
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, group=ps.get_data_parallel_group())
        loss_errs.append(abs(mean_loss.item() / layout.dp - ref_loss.item()) / ref_loss.item())
    ref_params = dict(reference.named_parameters())
    worst, worst_name = 0.0, ""
    with gathered_zero3(model, layout):
        for name, p in model.named_parameters():
            full, want = gather_full(p, ctx), ref_params[name].detach()
            err = ((full - want).abs().max() / want.abs().max()).item()
            if err > worst:
                worst, worst_name = err, name
    return {"loss_rel_err": max(loss_errs), "norm_rel_err": max(norm_errs),
            "param_rel_err": worst, "worst": worst_name}


def gathered_zero3(model, layout):
    """ZeRO-3 partitions parameters; gather them to read them (a no-op context otherwise)."""
    if layout.zero == "deepspeed" and layout.zero_stage == 3:
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(model.parameters()))
    return contextlib.nullcontext()


def check_pipeline(spec: dict, ref_group, steps: int = 3) -> dict:
    """Pipeline layouts: `steps` optimizer steps through megatron-core's schedules (1F1B, or
    interleaved with VPP) against one process; the conditioning embedders replicated on every
    stage must stay identical to each other (and to the reference)."""
    cfg = config_of({"train.num_microbatches": 4, **spec})
    layout = ParallelLayout.build(cfg, world_size())
    ctx = initialize_parallel(layout)
    microbatches = cfg.train.num_microbatches
    torch.manual_seed(0)
    reference = ECDiT(cfg.model, cfg.moe, ParallelContext(tp_group=ref_group))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    pp, vpp, pp_rank = layout.pp, layout.vpp, ps.get_pipeline_model_parallel_rank()
    chunks = []
    for v in range(vpp):
        chunk = ECDiT(cfg.model, cfg.moe, ctx,
                      layers=stage_layers(cfg.model.num_layers, pp, vpp, pp_rank, v),
                      pre_process=pp_rank == 0 and v == 0,
                      post_process=pp_rank == pp - 1 and v == vpp - 1)
        load_full_state(chunk, dict(reference.named_parameters()), ctx)
        chunks.append(chunk)
    cfg.optim.grad_clip = 0.05
    backend = MegatronZeRO(chunks, cfg.model, cfg.moe, cfg.optim, ctx, layout)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=cfg.optim.lr,
                                betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=0.0)
    schedule = get_forward_backward_func()
    rows = layout.dp * microbatches * MICRO_BATCH
    loss_errs, norm_errs = [], []
    for step in range(steps):
        batch = global_batch(rows, cfg, seed=200 + step)
        ref_opt.zero_grad()
        ref_loss = loss_of(reference, batch)
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.optim.grad_clip)
        ref_opt.step()

        dp_rank = ps.get_data_parallel_rank()
        mine = tuple(x[dp_rank * microbatches * MICRO_BATCH:(dp_rank + 1) * microbatches
                       * MICRO_BATCH] for x in batch)
        micro = [tuple(x[i * MICRO_BATCH:(i + 1) * MICRO_BATCH] for x in mine)
                 for i in range(microbatches)]

        def forward_step(data_iterator, model):
            x_t, t, text, mask, target = next(data_iterator)
            output = model(x_t, t, text, mask).prediction

            def loss_func(prediction):
                loss = flow_matching_loss(prediction, target)
                return loss, {"loss": loss.detach().clone()}  # megatron divides loss in place
            return output, loss_func

        backend.zero_grad()
        out = schedule(forward_step_func=forward_step,
                       data_iterator=[iter(micro) for _ in range(vpp)],
                       model=backend.modules if vpp > 1 else backend.modules[0],
                       num_microbatches=microbatches, seq_length=cfg.model.num_patches,
                       micro_batch_size=MICRO_BATCH)
        norm = backend.step(cfg.optim.lr)
        norm_errs.append(abs(norm - ref_norm.item()) / ref_norm.item())
        local = torch.tensor(sum(d["loss"].item() for d in out) / microbatches if out else 0.0)
        dist.all_reduce(local, group=ps.get_pipeline_model_parallel_group())
        dist.all_reduce(local, group=ps.get_data_parallel_group())
        loss_errs.append(abs(local.item() / layout.dp - ref_loss.item()) / ref_loss.item())

    ref_params = dict(reference.named_parameters())
    worst, worst_name = 0.0, ""
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            full, want = gather_full(p, ctx), ref_params[name].detach()
            err = ((full - want).abs().max() / want.abs().max()).item()
            if err > worst:
                worst, worst_name = err, name
    # The replicated embedders: every stage's (and chunk's) copy against the first one.
    flat = torch.cat([p.detach().reshape(-1) for p in chunks[0].t_embedder.parameters()])
    copies = [torch.empty_like(flat) for _ in range(pp)]
    dist.all_gather(copies, flat, group=ps.get_pipeline_model_parallel_group())
    replica_diff = max((c - copies[0]).abs().max().item() for c in copies)
    for chunk in chunks[1:]:
        other = torch.cat([p.detach().reshape(-1) for p in chunk.t_embedder.parameters()])
        replica_diff = max(replica_diff, (other - flat).abs().max().item())
    return {"layout": spec, "describe": layout.describe(), "loss_rel_err": 0.0,
            "grad_rel_err": 0.0, "train_loss_rel_err": max(loss_errs),
            "train_norm_rel_err": max(norm_errs),
            "train_param_rel_err": worst, "train_worst": worst_name,
            "embedder_replica_max_diff": replica_diff}


def check(spec: dict, ref_group) -> dict:
    if spec.get("pp", 1) > 1:  # checked through the schedules, with optimizer steps
        return check_pipeline(spec, ref_group)
    cfg, layout, ctx, reference, model = models(spec, ref_group)
    dp = layout.dp
    batch = global_batch(dp * MICRO_BATCH, cfg)
    local = local_slice(batch, layout)

    ref_loss = loss_of(reference, batch)
    ref_loss.backward()
    loss = loss_of(model, local)
    loss.backward()
    reduce_grads(model, ctx, dp)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=ps.get_data_parallel_group())
    mean_loss /= dp

    ref_params = dict(reference.named_parameters())
    # Relative to each tensor's largest gradient, floored at 1e-4 of the model's largest, so a
    # gradient that is zero in exact arithmetic (e.g. attention key biases) compares as noise.
    floor = 1e-4 * max(p.grad.abs().max().item() for p in ref_params.values())
    worst_grad, worst_name = 0.0, ""
    for name, p in model.named_parameters():
        full = gather_full(p, ctx, p.grad)
        want = ref_params[name].grad
        err = ((full - want).abs().max() / max(want.abs().max().item(), floor)).item()
        if err > worst_grad:
            worst_grad, worst_name = err, name
    loss_err = abs(mean_loss.item() - ref_loss.item()) / abs(ref_loss.item())
    training = check_training(spec, ref_group)
    return {"layout": spec, "describe": layout.describe(), "loss_rel_err": loss_err,
            "grad_rel_err": worst_grad, "worst": worst_name,
            "train_loss_rel_err": training["loss_rel_err"],
            "train_norm_rel_err": training["norm_rel_err"],
            "train_param_rel_err": training["param_rel_err"], "train_worst": training["worst"]}


def main() -> None:
    specs = json.loads(sys.argv[1])
    world_size()
    ref_group = single_rank_group()
    for spec in specs:
        result = check(spec, ref_group)
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
