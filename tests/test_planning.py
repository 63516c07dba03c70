"""The layout planner against the code: parameters per rank built at 64 to 512 ranks under a
fake process group, activation bytes against what autograd saves, recompute gradients, the
paper-size configs and the planner's recommendation for them. Under gloo (one 4-process launch
of tests/distributed/check_planning.py): recompute gradients at TP2+SP x EP2 and PP2, activation
bytes at TP2+SP and EP2, megatron-core's weights, optimizer state and gradient buffer in fp32
and bf16, and the demo trained at the planner's top layout for 4 ranks, measured against its
plan."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ecdit.config import Config, ConfigError, ModelConfig, MoEConfig, load_config
from megatron_ecdit.models.ecdit import ECDiT, ECDiTBlock
from megatron_ecdit.parallel.layout import ParallelLayout
from megatron_ecdit.planning import activations as act
from megatron_ecdit.planning.measure import SavedBytes
from megatron_ecdit.tools import plan_layout

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["data.urls=/data/{0..9}.tar", "text_encoder.path=/models/text", "vae.path=/models/vae"]
# config -> the cluster its parallel section was planned for (nodes of 8 GPUs)
PAPER_CONFIGS = {"xl_8e": 8, "xxl_16e": 16, "3xl_32e": 16, "m_64e": 64}


def test_planned_parameters_equal_the_built_shard_at_up_to_512_ranks():
    """M-64E at 512 ranks (two layouts), XL-8E at 64, 3XL-32E at 128: first and last pipeline
    stage, EP and TP ranks other than 0; the real chunks built on the meta device."""
    result = subprocess.run([sys.executable, "tests/distributed/check_planned_shards.py"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in result.stdout.splitlines() if " rank " in line]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert len(lines) == 17 and all(line.endswith("OK") for line in lines)
    assert any("M-64E world 512" in line and "ep 63" in line for line in lines)


SMALL = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, input_size=16,
                    patch_size=2, text_dim=32, in_channels=4)


def cpu_attention_bytes(shape: act.Shape) -> int:
    """What a CPU saves beyond the planned bf16 terms of a block: it runs the attention core in
    fp32 (models/attention.py), so q, k, v and the attention output are saved in fp32, and the
    output again in bf16 as the output projection's input."""
    terms = act.block_terms(SMALL, MoEConfig(), shape, None)
    core = {name: n for name, (n, _) in terms.items() if name.endswith((".q", ".kv", ".out"))}
    return sum(2 * n for n in core.values()) + sum(
        2 * n for name, n in core.items() if name.endswith(".out"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity_factor", [None, 2.0], ids=["dense", "expert_choice"])
@pytest.mark.parametrize("recompute", ["none", "moe_only", "full"])
def test_activation_bytes_per_block_match_what_autograd_saves(ctx, capacity_factor, recompute,
                                                              dtype):
    moe = MoEConfig(num_experts=8)
    block = ECDiTBlock(dataclasses.replace(ctx, recompute=recompute), SMALL, moe,
                       capacity_factor).to(dtype)
    S, B, L = SMALL.num_patches, 4, 8
    x = torch.randn(S, B, 64, dtype=dtype, requires_grad=True)
    c = torch.randn(B, 64, dtype=dtype, requires_grad=True)
    text = torch.randn(L, B, 64, dtype=dtype, requires_grad=True)
    with SavedBytes(block, exclude=[c, text]) as saved:
        block(x, c, text, torch.ones(B, L))
    shape = act.Shape(B, S, L, compute_bytes=dtype.itemsize)
    planned = act.block_bytes(SMALL, moe, shape, capacity_factor, recompute)
    if dtype == torch.bfloat16 and recompute != "full":
        planned += cpu_attention_bytes(shape)
    assert abs(planned / saved.total - 1) < 0.10, (planned, saved.total)


def _grads(ctx, recompute: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = ECDiT(SMALL, MoEConfig(num_experts=4), dataclasses.replace(ctx, recompute=recompute))
    for p in model.parameters():  # adaLN-Zero and zero outputs would leave most grads zero
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    out = model(x, torch.rand(2, generator=g), torch.randn(2, 8, 32, generator=g),
                torch.ones(2, 8))
    out.prediction.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_recompute_gives_the_same_gradients_in_one_process(ctx):
    reference = _grads(ctx, "none")
    assert sum(g.abs().sum() for g in reference.values()) > 0
    for recompute in ("full", "moe_only"):
        grads = _grads(ctx, recompute)
        for name, g in reference.items():
            torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_validates_and_its_layout_builds_at_its_cluster(name):
    cfg = load_config(ROOT / f"examples/configs/{name}.yaml", PATHS)
    world = PAPER_CONFIGS[name] * 8
    layout = ParallelLayout.build(cfg, world)
    t = cfg.train
    assert t.micro_batch_size * t.num_microbatches * layout.dp == 4096  # the paper's batch
    dense = load_config(ROOT / f"examples/configs/{name}.yaml", PATHS + ["moe.num_experts=0",
                        "parallel.ep=1"])
    assert dense.moe.moe_layer_indices(dense.model.num_layers) == []


def test_paper_config_names_each_missing_path():
    with pytest.raises(ConfigError, match="data.urls, text_encoder.path, vae.path"):
        load_config(ROOT / "examples/configs/xl_8e.yaml")
    with pytest.raises(ConfigError, match="vae.path"):
        load_config(ROOT / "examples/configs/xl_8e.yaml", PATHS[:2])


def test_planner_recommends_for_m_64e_the_layout_in_its_config(capsys):
    """The Done-when command: a table whose first row fits in 80 GB, and it is the layout
    examples/configs/m_64e.yaml carries."""
    config = ROOT / "examples/configs/m_64e.yaml"
    assert plan_layout.main(["--config", str(config), "--nodes", "64", "--gpus-per-node", "8",
                             "--gpu-memory-gib", "80", "--top", "5"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[2].split()
    assert float(first[-4]) <= 80  # GiB per GPU
    cfg = load_config(config, PATHS)
    line = next(l for l in out.splitlines() if l.startswith("overrides: "))
    for item in line.removeprefix("overrides: ").split():
        section, key = item.split("=")[0].split(".")
        value = getattr(getattr(cfg, section), key)
        assert item.split("=")[1] == (str(value).lower() if isinstance(value, bool) else str(value))


def test_planner_never_recommends_a_layout_the_job_refuses():
    """DeepSpeed ZeRO-3 with expert parallelism, or DeepSpeed with pipelining, is refused by
    ParallelLayout.build: pinned, nothing is left."""
    cfg = plan_layout.paper_config("XL-8E")
    from megatron_ecdit.planning.estimate import Cluster
    from megatron_ecdit.planning.search import plan
    for fixed in ({"zero": "deepspeed", "zero_stage": 3, "ep": 2},
                  {"zero": "deepspeed", "pp": 2}):
        fitting, over = plan(cfg, Cluster(1), 256, fixed=fixed)
        assert fitting == [] and over == 0, fixed
    fitting, _ = plan(cfg, Cluster(1), 256, fixed={"zero": "deepspeed", "zero_stage": 3})
    assert fitting and all(e.layout.zero_stage == 3 for e in fitting)
    fitting, _ = plan(cfg, Cluster(1), 256, fixed={"tp": 2, "sp": True, "ep": 2})
    assert fitting and all(ParallelLayout.build(_as_config(cfg, e), 8) for e in fitting[:20])


def test_gradient_buckets_hide_behind_the_last_backward_only_where_the_job_overlaps():
    """XL-8E on 2 nodes at PP1 (megatron ZeRO-1): the planner overlaps the gradient reduction,
    the same layout with overlap off pays all of it; what is hidden plus what stays exposed is
    the reduction's link time, the parameter all-gather and the last bucket stay exposed, and
    no more hides than the last micro-batch's backward. At PP2 nothing overlaps, and the output
    says why each kind of traffic is exposed."""
    from megatron_ecdit.planning.estimate import EXPOSED, Cluster, Run, estimate
    from megatron_ecdit.planning.search import plan
    cfg, cluster = plan_layout.paper_config("XL-8E"), Cluster(2)
    fitting, _ = plan(cfg, cluster, 256, fixed={"pp": 1, "zero": "megatron", "zero_stage": 1})
    on = fitting[0]
    assert on.layout.overlap_grad_reduce and all(e.layout.overlap_grad_reduce for e in fitting)
    trial = _as_config(cfg, on)
    trial.parallel.overlap_grad_reduce = False
    off = estimate(trial, ParallelLayout.build(trial, 16), cluster,
                   Run(256, on.run.micro_batch, "bf16"))
    assert off.hidden == {} and off.why_exposed["dp"].startswith(EXPOSED["dp_off"])
    total = off.times["dp"]
    assert on.times["dp"] + on.hidden["dp"] == pytest.approx(total, rel=1e-12)
    assert 0 < on.hidden["dp"] and on.step_time < off.step_time
    gather = total * 2 / (4 + 2)  # bf16 parameters gathered, fp32 gradients reduced
    backward = ((on.times["compute"] + on.times.get("tp", 0))
                * (1 - on.model_flops / 3 / on.flops))  # a recomputed forward counts
    assert on.times["dp"] >= gather + (total - gather) / 64  # never more than 64 buckets here
    assert on.hidden["dp"] <= backward / on.num_microbatches
    assert on.why_exposed["dp"].startswith(EXPOSED["dp_buckets"])
    assert EXPOSED["dp_gather"] in on.why_exposed["dp"]

    piped, _ = plan(cfg, cluster, 256, fixed={"pp": 2})
    assert piped and not any(e.layout.overlap_grad_reduce or e.hidden for e in piped)
    best = piped[0]
    assert best.why_exposed["dp"].startswith(EXPOSED["dp_pp"])
    communication = {k for k in best.times if k not in ("compute", "pipeline_bubble")}
    assert set(best.why_exposed) == communication and "pp" in communication


def test_node_sweep_gives_each_size_s_best_plan_and_its_scaling(capsys):
    """`--sweep-nodes` (the demo's model on nodes of 2 small GPUs): each size's row is plan()'s
    best at that size, its images/s, GPU-hours and scaling follow from its step time, and the
    verdict names the first size whose scaling falls under WORTH_IT, or says none does."""
    from megatron_ecdit.planning.estimate import Cluster
    from megatron_ecdit.planning.search import WORTH_IT, plan, where_it_stops_paying, sweep
    cfg, cluster = load_config(DEMO), Cluster(1, gpus_per_node=2, gpu_memory_gib=7.0)
    assert plan_layout.main(["--config", str(DEMO), "--gpus-per-node", "2", "--gpu-memory-gib",
                             "7", "--sweep-nodes", "2,1", "--global-batch", "64", "--json"]) == 0
    sizes = json.loads(capsys.readouterr().out)["sizes"]
    assert [s["nodes"] for s in sizes] == [1, 2]
    for size in sizes:
        fitting, _ = plan(cfg, dataclasses.replace(cluster, nodes=size["nodes"]), 64)
        best, row = fitting[0], size["best"]
        assert row["layout"] == dataclasses.asdict(best.layout)
        assert size["layouts_that_fit"] == len(fitting)
        assert row["images_per_s"] == pytest.approx(64 / best.step_time, rel=1e-12)
        assert row["gpu_hours_per_million_images"] == pytest.approx(
            2 * size["nodes"] * best.step_time / 3600 * 1e6 / 64, rel=1e-12)
    assert sizes[0]["scaling"] is None
    assert sizes[1]["scaling"] == pytest.approx(
        sizes[1]["best"]["images_per_s"] / sizes[0]["best"]["images_per_s"] / 2, rel=1e-12)

    rows = sweep(cfg, cluster, [1, 2], 64)
    assert rows[1].scaling == pytest.approx(sizes[1]["scaling"], rel=1e-12)
    stops = "adding GPUs stops paying past 1 nodes: 2 nodes give"
    assert where_it_stops_paying(rows).startswith(stops) == (rows[1].scaling < WORTH_IT)
    rows[1].scaling = WORTH_IT / 2
    assert where_it_stops_paying(rows).startswith(stops)
    rows[1].scaling = 1.0
    assert where_it_stops_paying(rows).startswith("adding GPUs still pays up to 2 nodes")
    for bad in (["--nodes", "2", "--sweep-nodes", "1,2"], ["--sweep-nodes", "1,x"],
                ["--sweep-nodes", "1,1"]):
        with pytest.raises(SystemExit) as exit_:
            plan_layout.main(["--size", "XL-8E", *bad])
        assert exit_.value.code == 2, bad


def _as_config(cfg: Config, est) -> Config:
    from megatron_ecdit.planning.search import overrides
    base = dataclasses.asdict(cfg)
    return load_config(base=base, overrides=overrides(est))


# ---------------------------------------------------------------- under gloo, 4 processes

DEMO = ROOT / "examples/configs/demo.yaml"
DEMO_CLUSTER = dict(nodes=1, gpus_per_node=4, gpu_memory_gib=7.0)  # 6 GiB of it reserved
DEMO_BATCH = 64


def demo_plan():
    """The planner's best layout for the demo on 4 ranks, in fp32: the job below trains in fp32
    too (its bf16 on a CPU runs the attention core in fp32, which the per-block test above
    accounts for; the planner's bf16 is a GPU's)."""
    from megatron_ecdit.planning.estimate import Cluster
    from megatron_ecdit.planning.search import overrides, plan
    fitting, _ = plan(load_config(DEMO), Cluster(**DEMO_CLUSTER), DEMO_BATCH, precision="fp32")
    return fitting[0], overrides(fitting[0])


@pytest.fixture(scope="module")
def gloo(tmp_path_factory):
    """One 4-process launch of tests/distributed/check_planning.py: check name -> each rank's
    numbers; and the demo's plan."""
    out = tmp_path_factory.mktemp("plan")
    best, layout = demo_plan()
    job = {"config": str(DEMO), "overrides": layout + ["train.precision=fp32",
        f"data.urls={out}/data/{{000000..000003}}.tar", "data.samples_per_shard=16",
        f"train.output_dir={out}/run", "train.steps=3", "optim.warmup_steps=1"]}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "4", str(ROOT / "tests/distributed/check_planning.py"), json.dumps(job)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    checks = {}
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            record = json.loads(line.removeprefix("RESULT "))
            checks[record["check"]] = record["ranks"]
    return checks, best



def test_recompute_gives_the_same_gradients_at_tp2_sp_ep2_and_pp2(gloo):
    """Every rank's gradients with `full` and `moe_only` recompute equal those without."""
    checks, _ = gloo
    for name in ("recompute TP2+SP x EP2", "recompute PP2"):
        for rank in checks[name]:
            assert rank["grad_abs_max"] > 1e-3, (name, rank)
            for mode in ("full", "moe_only"):
                diff, param = rank[mode]
                assert diff <= 1e-6, (name, mode, param, diff)


@pytest.mark.parametrize("layout", ["TP2+SP", "EP2", "TP2+SP x EP2"])
def test_activation_bytes_per_block_match_what_autograd_saves_under_gloo(gloo, layout):
    checks, _ = gloo
    ratios = checks[f"activations {layout}"][0]["ratios"]  # planned / saved, per block kind
    assert len(ratios) == 6 and all(abs(r - 1) < 0.10 for r in ratios.values()), ratios
    assert all(rank["ratios"] == ratios for rank in checks[f"activations {layout}"])


def _model_states_agree(ranks: list[dict], planned: dict) -> None:
    """Weights: the parameters' bytes, exactly. Optimizer state (Adam moments, and under bf16
    the fp32 main weights): the planner's (P_dense / DP + P_expert / EDP) x 8 bytes (fp32) or
    x 12 (bf16) per rank; the distributed optimizer splits each bucket by elements, so a rank's
    share is off by a few elements where a shard boundary cuts a parameter, and the sum over
    ranks is exact (the planned shares are the same on every rank of this layout). Gradients:
    megatron-core pads each parameter's start and each bucket's end in its fp32 buffer (under
    1% here)."""
    for rank in ranks:
        assert rank["weights"] == planned["weights"], (rank, planned)
    states = [rank["optimizer"] for rank in ranks]
    assert sum(states) == round(len(ranks) * planned["optimizer"]), (states, planned)
    assert all(abs(m / planned["optimizer"] - 1) < 1e-3 for m in states), (states, planned)
    for rank in ranks:
        assert 1 <= rank["gradients"] / planned["gradients"] < 1.01, (rank, planned)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_optimizer_and_gradient_bytes_equal_megatron_core_s_at_tp2_sp_ep2(gloo, precision):
    """The real distributed optimizer over a model of that precision: under bf16 bf16
    parameters, fp32 main-weight shards and moments, an fp32 gradient buffer."""
    checks, _ = gloo
    ranks = checks[f"model states {precision} TP2+SP x EP2"]
    _model_states_agree([rank["real"] for rank in ranks], ranks[0]["planned"])


def test_demo_trains_at_the_planner_s_top_layout_and_matches_its_plan(gloo):
    """The demo at 4 ranks trains 3 steps at the planner's first layout; per rank, the bytes
    autograd saves in a step are within 10% of the plan's activations, and its weights,
    optimizer state and gradient buffer agree with the plan's."""
    checks, best = gloo
    ranks = checks["job"]
    assert {rank["layout"] for rank in ranks} == {best.layout.describe()}
    losses = [rank["losses"] for rank in ranks]
    assert all(len(l) == 3 and all(map(math.isfinite, l)) for l in losses), losses
    for rank in ranks:
        assert abs(rank["activations"] / best.memory["activations"] - 1) < 0.10, (
            rank["activations"], best.memory["activations"])
    _model_states_agree(ranks, best.memory)
