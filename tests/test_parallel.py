"""The parallel layout's validation and the CPU compatibility layer (single process)."""

from pathlib import Path

import pytest
import torch

from megatron_ecdit.config import ConfigError, load_config
from megatron_ecdit.parallel import cpu_compat
from megatron_ecdit.parallel.layout import ParallelLayout


def layout(world, *overrides):
    return ParallelLayout.build(load_config(overrides=list(overrides)), world)


def test_degrees_and_expert_grid():
    lay = layout(8, "parallel.tp=2", "parallel.pp=2", "parallel.ep=2")
    assert (lay.dp, lay.etp, lay.expert_dp) == (2, 2, 1)
    lay = layout(8, "parallel.pp=2", "parallel.ep=2")
    assert (lay.dp, lay.etp, lay.expert_dp) == (4, 1, 2)
    assert "EP2" in lay.describe()


@pytest.mark.parametrize("world,overrides,message", [
    (4, ["moe.num_experts=6", "parallel.ep=4"], "moe.num_experts=6 is not divisible by parallel.ep=4"),
    (4, ["parallel.tp=4"], "model.num_kv_heads=2 is not divisible by parallel.tp=4"),
    (6, ["parallel.tp=4"], "world size 6 is not divisible by parallel.tp x parallel.pp"),
    (4, ["parallel.pp=4"], "model.num_layers=6 is not divisible by parallel.pp x parallel.vpp"),
    (2, ["parallel.vpp=2"], "parallel.vpp > 1 needs parallel.pp > 1"),
    (2, ["parallel.sp=true"], "needs parallel.tp > 1"),
    (4, ["parallel.tp=2", "parallel.etp=1"], "parallel.etp=1 must equal parallel.tp=2"),
    (2, ["parallel.zero=deepspeed", "parallel.pp=2"], "parallel.pp = 1 only"),
    (2, ["parallel.zero=deepspeed", "parallel.zero_stage=4"], "must be 1, 2 or 3 for DeepSpeed"),
    (2, ["parallel.zero=deepspeed", "parallel.zero_stage=3", "parallel.ep=2"],
     "parallel.ep > 1 supports zero_stage 1 or 2"),
    (2, ["parallel.zero=deepspeed", "parallel.zero_stage=3", "checkpoint.async_save=true"],
     "async_save does not work with DeepSpeed ZeRO-3"),
    (2, ["parallel.zero_stage=2"], "zero_stage 0 (DDP) or 1"),
    (2, ["parallel.pp=2", "parallel.overlap_grad_reduce=true"],
     "overlap_grad_reduce works with parallel.pp = 1 only"),
    (2, ["moe.num_experts=0", "parallel.ep=2"], "parallel.ep > 1 needs moe.num_experts > 0"),
])
def test_impossible_layouts_name_the_constraint(world, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        layout(world, *overrides)


def test_rmsprop_runs_on_every_backend():
    for zero_stage in (1, 2, 3):
        assert layout(2, "optim.name=rmsprop", "parallel.zero=deepspeed",
                      f"parallel.zero_stage={zero_stage}").zero == "deepspeed"
    for zero_stage in (0, 1):
        assert layout(2, "optim.name=rmsprop", f"parallel.zero_stage={zero_stage}").zero == \
            "megatron"
    assert layout(1, "optim.name=rmsprop").world_size == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is never applied on a GPU")
def test_cpu_compat_redirects_only_megatron(ctx):
    assert cpu_compat.apply() is True  # already applied by the fixture; idempotent
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.optimizer import clip_grads
    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    assert schedules.torch.cuda.current_device() == torch.device("cpu")
    assert schedules.torch.cuda.synchronize() is None
    # Tensor.type(): CUDA names for megatron-core's dtype checks, unchanged for everyone else.
    assert torch.zeros(1).type() == "torch.FloatTensor"
    namespace = {"__name__": "megatron.core.fake"}
    exec("def name(t):\n    return t.type()", namespace)
    assert namespace["name"](torch.zeros(1)) == "torch.cuda.FloatTensor"
    assert clip_grads.torch is not torch  # patched module
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64


def test_imports_point_one_way_and_the_loop_names_no_backend():
    """models and moe import neither parallel nor training; parallel does not import
    training; the training loop sees only the backend interface."""
    package = Path(__file__).resolve().parents[1] / "megatron_ecdit"
    for folder, forbidden in (("models", ("megatron_ecdit.parallel", "megatron_ecdit.training")),
                              ("moe", ("megatron_ecdit.parallel", "megatron_ecdit.training")),
                              ("parallel", ("megatron_ecdit.training",))):
        for source in (package / folder).rglob("*.py"):
            imports = [line.split()[1] for line in source.read_text().splitlines()
                       if line.lstrip().startswith(("from megatron_ecdit", "import megatron_ecdit"))]
            assert not [m for m in imports if m.startswith(forbidden)], source
    trainer = (package / "training" / "trainer.py").read_text()
    assert not [n for n in ("TorchOptimizer", "MegatronZeRO", "DeepSpeedZeRO") if n in trainer]
