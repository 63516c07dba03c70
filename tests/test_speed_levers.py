"""Speed levers equal the plain path (fp32, 1e-5): compiled blocks, torch's optimizer
implementations, the multi-tensor EMA; bf16 parameters with fp32 main weights within the
documented tolerance (training/step_checks.py: BF16_RTOL, >= 99.5% of expert choices equal);
and a training step reads nothing back from the device except its documented logging point.
Compiled training jobs, through the entry point at TP2+SP, PP2, EP2 and DeepSpeed ZeRO-1, are
tests/test_entry_point.py's. Timings are benchmarks/bench_train_step.py's job;
benchmarks/gpu/check_gpu.py runs the bf16 and host-read checks on a GPU."""

import pytest
import torch

from megatron_ecdit.config import Config, ConfigError, OptimConfig
from megatron_ecdit.diffusion.rectified_flow import flow_matching_loss
from megatron_ecdit.models.ecdit import ECDiT
from megatron_ecdit.parallel.backends.one_process import TorchOptimizer
from megatron_ecdit.parallel.compile import apply_compile, eager_blocks
from megatron_ecdit.parallel.layout import ParallelLayout
from megatron_ecdit.training.optim import EMA
from megatron_ecdit.training.step_checks import (BF16_CHOICES, HostCopies, HostReads,
                                                 bf16_against_fp32, tiny_model_config)


def tiny_model() -> ECDiT:
    """Two blocks: a dense one and an EC-MoE one (4 experts), 16 tokens per image."""
    torch.manual_seed(0)
    return ECDiT(*tiny_model_config())


def batch(B: int = 2, L: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None] < torch.tensor([L, 3] * (B // 2) or [L])[:, None]
    return ((torch.randn(B, 3, 8, 8, generator=g), torch.rand(B, generator=g),
             torch.randn(B, L, 16, generator=g), mask), torch.randn(B, 3, 8, 8, generator=g))


def loss_and_grads(model: ECDiT, inputs, target):
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    loss = flow_matching_loss(out.prediction, target)
    loss.backward()
    return out.prediction.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_blocks_equal_eager_and_sampling_compiles_nothing(ctx):
    model = tiny_model()
    inputs, target = batch()
    eager_out, eager_grads = loss_and_grads(model, inputs, target)
    apply_compile(model)
    torch._dynamo.reset()
    compiled_out, compiled_grads = loss_and_grads(model, inputs, target)
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    # Compiled once: a second step (new values, same shapes) makes no new graphs.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    loss_and_grads(model, *batch(seed=3))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    # The sampler's calls (no gradients, eval mode, another batch) run eagerly: no new graphs.
    model.eval()
    with torch.no_grad(), eager_blocks():
        model(*batch(B=1, seed=2)[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_compile_is_refused_with_deepspeed_zero_2_and_3_only():
    cfg = Config()
    cfg.train.compile = True
    cfg.parallel.tp = 2
    assert ParallelLayout.build(cfg, world_size=2).tp == 2
    cfg.parallel.zero, cfg.parallel.zero_stage = "deepspeed", 1
    assert ParallelLayout.build(cfg, world_size=2).zero_stage == 1
    for stage in (2, 3):
        cfg.parallel.zero_stage = stage
        with pytest.raises(ConfigError, match="train.compile does not work with DeepSpeed ZeRO"):
            ParallelLayout.build(cfg, world_size=2)


def train_three_steps(implementation: str, name: str = "adamw") -> dict[str, torch.Tensor]:
    """Three clipped steps (the clip is active: max norm below the gradients' norm)."""
    model = tiny_model()
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.1, grad_clip=0.05,
                      implementation=implementation)
    backend = TorchOptimizer(model, cfg)
    for step in range(3):
        inputs, target = batch(seed=step)
        backend.zero_grad()
        backend.backward(flow_matching_loss(model(*inputs).prediction, target))
        assert backend.step(cfg.lr) > cfg.grad_clip
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,implementations", [("adamw", ["foreach", "fused"]),
                                                  ("rmsprop", ["foreach", "fused"])])
def test_optimizer_implementations_equal_the_loop(ctx, name, implementations):
    reference = train_three_steps("for_loop", name)
    for implementation in implementations:
        params = train_three_steps(implementation, name)
        for key, value in reference.items():
            torch.testing.assert_close(params[key], value, atol=1e-5, rtol=1e-5,
                                       msg=f"{implementation}: {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_ema_equals_a_lerp_per_tensor(dtype, monkeypatch):
    from megatron_ecdit.training import optim
    monkeypatch.setattr(optim, "SLICE", 100)  # bf16 weights widened in several slices
    model = tiny_model().to(dtype)
    ema = EMA(model, 0.9)
    expected = {n: v.clone() for n, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        assert ema.shadow[name].dtype == torch.float32
        assert torch.equal(ema.shadow[name], expected[name].lerp_(p.float(), 0.1)), name


@pytest.mark.parametrize("implementation,dtype", [("fused", torch.float32),
                                                  ("foreach", torch.float32),
                                                  ("fused", torch.bfloat16)])
def test_training_step_reads_nothing_back_from_the_device(ctx, implementation, dtype):
    """Forward, loss, backward and EMA read nothing; the optimizer step reads the gradient norm
    once (`TorchOptimizer.step` returns it for logging: the documented point). With foreach,
    torch also reads its step counters, which are host tensors even on a GPU. bf16 parameters
    add their main weights' gradients and the copy back: no reads either."""
    model = tiny_model().to(dtype)
    backend = TorchOptimizer(model, OptimConfig(implementation=implementation))
    ema = EMA(model, 0.99)
    inputs, target = batch()
    for step in range(2):  # the second step has optimizer state
        backend.zero_grad()
        with HostReads() as mode, HostCopies(mode.reads):
            loss = flow_matching_loss(model(*inputs).prediction, target)
            backend.backward(loss)
        assert mode.reads == [], [(op, site) for op, _, site in mode.reads]
        with HostReads() as mode, HostCopies(mode.reads):
            backend.step(1e-3)
            ema.update(model)
        counters = {id(s["step"]) for s in backend.optimizer.state.values()}
        reads = [(op, site) for op, t, site in mode.reads if id(t) not in counters]
        assert len(reads) == 1 and reads[0][1] == "one_process.py:step", reads
        if implementation == "fused":
            assert len(mode.reads) == 1


# ------------------------------------------------------------------ bf16 (megatron-style)

def test_bf16_parameters_compute_like_fp32(ctx):
    """Same initial weights, same batch: the prediction and each gradient (the fp32 main
    weights' gradient under bf16) within BF16_RTOL, and >= 99.5% of the expert choices equal,
    given the same input and end to end (step_checks.bf16_against_fp32, which the GPU check
    runs at XL width)."""
    inputs, target = batch(B=64)
    result = bf16_against_fp32(tiny_model, inputs, target)
    assert result.choices == result.layer_choices >= 1000
    assert result.failures() == []
    assert result.agreeing >= BF16_CHOICES * result.choices


def test_bf16_gradients_accumulate_in_fp32_and_the_step_updates_the_main_weights(ctx):
    """Two micro-batches: each main gradient is the fp32 sum of the two bf16 gradients (which
    a bf16 sum would round); after the step the parameters are the main weights rounded to
    bf16, and the optimizer's state is fp32."""
    model = tiny_model().to(torch.bfloat16)
    backend = TorchOptimizer(model, OptimConfig(lr=1e-2))
    alone = []
    for seed in (1, 2):
        backend.zero_grad()
        inputs, target = batch(seed=seed)
        backend.backward(flow_matching_loss(model(*inputs).prediction, target) / 2)
        assert all(p.grad is None for p in model.parameters())  # moved to the main weights
        alone.append({p: backend.main[p].grad.clone() for p in model.parameters()})
    backend.zero_grad()
    for seed in (1, 2):
        inputs, target = batch(seed=seed)
        backend.backward(flow_matching_loss(model(*inputs).prediction, target) / 2)
    rounded = 0
    for p in model.parameters():
        expected = alone[0][p] + alone[1][p]
        torch.testing.assert_close(backend.main[p].grad, expected, rtol=1e-6, atol=1e-12)
        rounded += int((expected.bfloat16().float() != expected).sum())
    assert rounded > 0
    before = {p: backend.main[p].detach().clone() for p in model.parameters()}
    backend.step(1e-2)
    moved = 0
    for p in model.parameters():
        main = backend.main[p]
        assert main.dtype == torch.float32
        assert torch.equal(p, main.detach().to(torch.bfloat16))
        moved += int(not torch.equal(main, before[p]))
    assert moved > 0
    assert all(s["exp_avg"].dtype == torch.float32 for s in backend.optimizer.state.values())
