"""Speed levers equal the plain path (fp32, 1e-5): compiled blocks, torch's optimizer
implementations, the multi-tensor EMA; bf16 parameters with fp32 main weights within the
documented tolerance (BF16_RTOL, >= 99.5% of expert choices equal); and a training step reads
nothing back from the device except its documented logging point. Timings are benchmarks/bench_train_step.py's job."""

import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ecdit.config import Config, ConfigError, ModelConfig, MoEConfig, OptimConfig
from megatron_ecdit.diffusion.rectified_flow import flow_matching_loss
from megatron_ecdit.models.ecdit import ECDiT
from megatron_ecdit.parallel.backends.one_process import TorchOptimizer
from megatron_ecdit.parallel.compile import apply_compile, eager_blocks
from megatron_ecdit.parallel.layout import ParallelLayout
from megatron_ecdit.training.optim import EMA

aten = torch.ops.aten


def tiny_model() -> ECDiT:
    """Two blocks: a dense one and an EC-MoE one (4 experts), 16 tokens per image."""
    torch.manual_seed(0)
    model = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, input_size=8,
                        patch_size=2, text_dim=16)
    return ECDiT(model, MoEConfig(num_experts=4))


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


def test_training_job_with_compiled_blocks_trains_like_eager(tmp_path, ctx):
    """train.compile end to end: the same losses (1e-5), and sampling at the end runs."""
    from test_training import losses, tiny
    from megatron_ecdit.training.trainer import train

    for name, compiled in (("eager", "false"), ("compiled", "true")):
        train(tiny(tmp_path / name, "train.steps=4", "train.tensorboard=false",
                   "checkpoint.save_interval=0", f"train.compile={compiled}"))
    eager, compiled = losses(tmp_path / "eager/out"), losses(tmp_path / "compiled/out")
    assert len(compiled) == 4
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "compiled/out/samples.png").is_file()


def test_compile_is_refused_with_deepspeed_only():
    cfg = Config()
    cfg.train.compile = True
    cfg.parallel.tp = 2
    assert ParallelLayout.build(cfg, world_size=2).tp == 2
    cfg.parallel.zero = "deepspeed"
    with pytest.raises(ConfigError, match="train.compile does not work with parallel.zero=deep"):
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


class HostReads(TorchDispatchMode):
    """Records every op that makes the host wait for the device: a scalar read (`item`,
    `float`, `int`, `bool` of a tensor all reach aten._local_scalar_dense) or an op whose output
    shape depends on the data (nonzero, masked_select, unique; boolean-mask indexing runs
    nonzero). Python-level copies to the host (`tolist`, `cpu`, `numpy`) are caught by
    `HostCopies`. Each read keeps the tensor read and the innermost project frame."""

    SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2,
               aten.unique_consecutive, aten.unique_dim}

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, torch.Tensor, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SYNCING:
            self.reads.append((str(func), args[0], where()))
        return func(*args, **(kwargs or {}))


class HostCopies(TorchFunctionMode):
    def __init__(self, reads: list):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy):
            self.reads.append((func.__name__, args[0], where()))
        return func(*args, **(kwargs or {}))


def where() -> str:
    frames = [f for f in traceback.extract_stack() if "megatron_ecdit" in f.filename
              and "test_" not in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "torch"


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

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); through two blocks, the
# prediction and the gradients move by well under 1% (measured up to 0.45%), and a few expert choices
# at the boundary of an expert's top-C flip.
BF16_RTOL = 2e-2
BF16_CHOICES = 0.995


def routed_tokens(model: ECDiT) -> list:
    """Forward hooks recording, per MoE router call, each (expert, slot)'s token index."""
    recorded = []
    for module in model.modules():
        if module.__class__.__name__ == "ExpertChoiceRouter":
            module.register_forward_hook(lambda m, args, out: recorded.append(out.token_index_EN))
    return recorded


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_parameters_compute_like_fp32(ctx):
    """Same initial weights, same batch: the prediction and each gradient (the fp32 main
    weights' gradient under bf16) within BF16_RTOL, and >= 99.5% of the expert choices equal."""
    fp32 = tiny_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the zero-initialised outputs, as after some training
        for p in fp32.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    bf16 = tiny_model()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    backend = TorchOptimizer(bf16, OptimConfig())
    inputs, target = batch(B=64)
    choices = {}
    outputs = {}
    for name, model in (("fp32", fp32), ("bf16", bf16)):
        choices[name] = routed_tokens(model)
        out = model(*inputs)
        assert out.prediction.dtype == torch.float32  # the model hands back fp32
        flow_matching_loss(out.prediction, target).backward()
        outputs[name] = out.prediction.detach()
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in bf16.parameters())
    assert relative_error(outputs["bf16"], outputs["fp32"]) <= BF16_RTOL
    # Each gradient relative to its own norm, or to 1% of the whole gradient's for those that
    # are zero in exact arithmetic (the key bias: softmax ignores a shift) and only noise.
    whole = torch.cat([p.grad.reshape(-1) for p in fp32.parameters()]).norm()
    for (name, p32), p16 in zip(fp32.named_parameters(), bf16.parameters()):
        main = backend.main[p16]
        assert main.dtype == torch.float32 and main.grad.dtype == torch.float32
        error = (main.grad - p32.grad).norm() / torch.maximum(p32.grad.norm(), 1e-2 * whole)
        assert error <= BF16_RTOL, name
    agree = total = 0
    for ref, mine in zip(choices["fp32"], choices["bf16"]):
        for e in range(ref.shape[0]):  # (E, N): the tokens each expert chose
            ref_set, mine_set = set(ref[e].tolist()), set(mine[e].tolist())
            agree, total = agree + len(ref_set & mine_set), total + len(ref_set)
    assert total >= 1000 and agree / total >= BF16_CHOICES, (agree, total)


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
