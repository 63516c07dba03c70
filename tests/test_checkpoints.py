"""Checkpoints: exact resume, crashes and signals, resharding across layouts and backends,
conversion to and from the consolidated format, and bad checkpoints.

Multi-process checks run tests/distributed/check_checkpoints.py under torchrun; the
one-process ones run in this process or as a child (signals).
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

import check_checkpoints as cc  # noqa: E402
from conftest import run_in_own_session  # noqa: E402
from megatron_ecdit.checkpoint import consolidated, distributed  # noqa: E402
from megatron_ecdit.checkpoint import exported as exported_files  # noqa: E402
from megatron_ecdit.checkpoint.distributed import CheckpointError  # noqa: E402
from megatron_ecdit.training.trainer import Job, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests/distributed/check_checkpoints.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_DYNAMIC="FALSE")
TOL = 1e-5


def launch(nproc: int, *args: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), str(SCRIPT), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "stdout": result.stdout}


def run_child(*args) -> int:
    """Run `check_checkpoints.py ARGS` in its own session (see conftest.run_in_own_session)."""
    return run_in_own_session([sys.executable, str(SCRIPT), *map(str, args)], ENV)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").open())}


# --------------------------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------------------------


def test_sigkill_at_step_8_then_resume_equals_uninterrupted(tmp_path):
    """Save at step 5, SIGKILL after step 8, resume (train.resume=auto): steps 6-10 are
    bitwise those of an uninterrupted run (fp32, one thread, same seed)."""
    every = ["train.steps=10", "checkpoint.save_interval=5"]
    whole, broken = tmp_path / "whole" / "out", tmp_path / "broken" / "out"
    for out in (whole, broken):
        (out.parent / "data").mkdir(parents=True)
    assert run_child("kill", 1000, whole, *every) == 0
    assert run_child("kill", 8, broken, *every) == -signal.SIGKILL
    assert distributed.latest_checkpoint(broken / "checkpoints").name == "step_0000005"
    assert max(losses(broken)) == 8
    assert run_child("kill", 1000, broken, *every) == 0
    expected, resumed = losses(whole), losses(broken)
    assert sorted(resumed) == list(range(1, 11))
    assert [resumed[s] for s in range(6, 11)] == [expected[s] for s in range(6, 11)]


def test_sigterm_saves_at_the_next_step_and_exits_to_be_resumed(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "pretrain_ecdit.py"), *cc.TINY, "train.steps=100000",
           "checkpoint.save_interval=0", f"train.output_dir={out}",
           "data.samples_per_shard=16", f"data.urls={tmp_path}/data/{{000000..000001}}.tar"]
    child = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file()
                                          and len((out / "metrics.jsonl").read_text()) > 0):
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    output, _ = child.communicate(timeout=240)
    assert child.returncode == 75, output[-3000:]  # "resume me"
    assert not (out / "finished").exists()
    last = max(losses(out))
    assert f"stopped at step {last} (signal received)" in output
    assert distributed.latest_checkpoint(out / "checkpoints").name == f"step_{last:07d}"
    assert distributed.read_common(out / "checkpoints" / f"step_{last:07d}")["step"] == last


def test_time_limit_stops_cleanly(tmp_path, ctx):
    summary = train(cc.config(tmp_path / "out", ["train.steps=100000",
                                                 "train.exit_duration_minutes=0.0001"]))
    assert summary["stopped"] == "time limit reached"
    path = distributed.latest_checkpoint(tmp_path / "out" / "checkpoints")
    assert distributed.read_common(path)["step"] == max(losses(tmp_path / "out"))


def test_asynchronous_save_resumes_exactly(tmp_path, ctx):
    """checkpoint.async_save: shards are written by a forked process while training goes on;
    the published checkpoints resume as exactly as synchronous ones."""
    r = cc.resume(tmp_path / "out", ["checkpoint.async_save=true"])
    assert r["full"] == r["resumed"] and len(r["full"]) == 4
    root = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000002", "step_0000004"]
    assert not list(root.glob(".tmp-*"))


def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path, ctx,
                                                                     monkeypatch):
    out = tmp_path / "out"
    train(cc.config(out, ["train.steps=2"]))
    real_save = distributed.dist_checkpointing.save

    def dying_save(state, directory, **kwargs):
        (Path(directory) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(distributed.dist_checkpointing, "save", dying_save)
    job = Job(cc.config(out, ["train.steps=4"]))
    assert job.resume() == 2
    with pytest.raises(distributed.SaveError, match=r"step_0000003 failed: disk full; .*"
                       r"\.tmp-step_0000003 was removed and latest still points"):
        job.save(3)
    monkeypatch.setattr(distributed.dist_checkpointing, "save", real_save)
    root = out / "checkpoints"
    assert distributed.latest_checkpoint(root).name == "step_0000002"
    assert not (root / ".tmp-step_0000003").exists() and not (root / "step_0000003").exists()
    assert Job(cc.config(out, ["train.steps=4"])).resume() == 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A one-process run of 4 steps with checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("saved") / "out"
    train(cc.config(out, ["train.resume=never"]))
    return out / "checkpoints" / "step_0000004"


class _RunsCode:
    def __reduce__(self):  # unpickling this would run a shell command
        return os.system, ("echo unpickled",)


def test_truncated_or_foreign_checkpoints_name_the_part(saved, tmp_path, ctx):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    data = sorted(broken.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"data file {data.name} is truncated"):
        distributed.verify(broken)
    (broken / "common.pt").unlink()
    with pytest.raises(CheckpointError, match="common.pt is missing"):
        distributed.verify(broken)
    foreign = tmp_path / "foreign"
    shutil.copytree(saved, foreign)
    (foreign / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError, match=r"\.system is not part of a checkpoint index"):
        distributed.verify(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        distributed.verify(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="metadata.json is missing"):
        distributed.verify(tmp_path)


def test_loading_into_other_model_dimensions_names_the_tensor(saved, tmp_path, ctx):
    job = Job(cc.config(tmp_path / "out", ["model.hidden_size=64", f"train.resume={saved}"]))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.[a-z_.0-9]+' has shape"):
        job.resume()


def test_an_export_loads_without_torch_distributed_in_its_stored_dtype(saved, tmp_path, ctx):
    folder = consolidated.export(saved, tmp_path / "export", weights="model", dtype="bf16",
                                 progress=False)
    code = ("import sys, torch; from megatron_ecdit.checkpoint.consolidated import "
            "load_pretrained; cfg, model = load_pretrained(sys.argv[1]); "
            "cfg, wide = load_pretrained(sys.argv[1], dtype='fp32'); "
            "assert not torch.distributed.is_initialized(); "
            "assert all(torch.equal(a.float(), b) for a, b in "
            "zip(model.parameters(), wide.parameters())); "
            "print({p.dtype for p in model.parameters()}, {p.dtype for p in wide.parameters()})")
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                            text=True, env=dict(ENV, PYTHONPATH=str(ROOT)), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{torch.bfloat16} {torch.float32}", result.stdout
    job = Job(cc.config(tmp_path / "out", [f"train.resume={saved}"]))
    job.resume()
    exported = consolidated.open_export(folder)
    assert exported.info == {"step": 4, "weights": "model", "dtype": "bf16",
                             "source_layout": job.layout.describe()}
    for name, p in job.model.named_parameters():
        stored = exported.weights.read(name)
        assert stored.dtype == torch.bfloat16 and torch.equal(
            stored, p.detach().to(torch.bfloat16)), name
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        consolidated.open_export(folder)


# --------------------------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """TP2 x PP2 x EP2 (x DP2) on 8 processes: train 4 steps saving at 2 and 4, resume from 2.
    Its optimizer state is saved fully reshardable, to be moved to other layouts."""
    out = tmp_path_factory.mktemp("tp2pp2ep2") / "out"
    return out, launch(8, "resume", out, "parallel.tp=2", "parallel.pp=2", "parallel.ep=2",
                       "checkpoint.optimizer_sharding=fully_reshardable")


def test_resume_is_exact_at_tp2_pp2_ep2(big):
    _, r = big
    assert r["full"] == r["resumed"] and len(r["full"]) == 4


def test_resume_is_exact_with_interleaved_pipeline(tmp_path):
    """PP2 x VPP2: two model chunks per rank, and a stage without MoE blocks (whose expert
    optimizer holds no parameters)."""
    r = launch(2, "resume", tmp_path / "out", "parallel.pp=2", "parallel.vpp=2",
               "train.num_microbatches=2")
    assert r["full"] == r["resumed"] and len(r["full"]) == 4


def test_reshard_tp2_pp2_ep2_to_ep4_and_one_process(big, tmp_path, ctx):
    from megatron.core import dist_checkpointing

    out, _ = big
    ckpt, ref = out / "checkpoints" / "step_0000004", out / "outputs.npz"
    at_ep4 = launch(4, "load", ckpt, ref, tmp_path / "ep4" / "out", "parallel.ep=4",
                    "checkpoint.optimizer_sharding=fully_reshardable")
    assert "optimizer state not restored" not in at_ep4["stdout"]
    assert at_ep4["step"] == 4
    assert at_ep4["model_rel_err"] <= TOL and at_ep4["ema_rel_err"] <= TOL, at_ep4
    one = cc.load(str(ckpt), str(ref), tmp_path / "one" / "out", [])
    assert one["model_rel_err"] <= TOL and one["ema_rel_err"] <= TOL, one
    # Loaded vs saved: everything the EP4 run read and wrote again is bit-identical, optimizer
    # state (megatron's distributed optimizer, DP2 -> DP4) included.
    a = _flat(dist_checkpointing.load_plain_tensors(str(ckpt)))
    b = _flat(dist_checkpointing.load_plain_tensors(
        str(tmp_path / "ep4" / "out" / "checkpoints" / "step_0000004")))
    assert set(a) == set(b) and any("optimizer" in k and "exp_avg_sq" in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_each_rank_s_own_optimizer_buffers_load_at_another_data_parallel_size(tmp_path):
    """The routine format (dp_reshardable, megatron-core's distributed optimizer): saved at
    DP2, the optimizer state loads at DP4 exactly (both written again in model space, every
    tensor bit-identical); at another expert-parallel size the weights load and the optimizer
    starts fresh, which the log says."""
    from megatron.core import dist_checkpointing

    out = tmp_path / "dp2" / "out"
    r = launch(2, "resume", out)
    assert r["full"] == r["resumed"]
    ckpt, ref = out / "checkpoints" / "step_0000004", out / "outputs.npz"
    assert distributed.read_common(ckpt)["optimizer_sharding"] == "dp_reshardable"
    model_space = "checkpoint.optimizer_sharding=fully_reshardable"
    again = {n: launch(n, "load", ckpt, ref, tmp_path / f"dp{n}" / "again", model_space)
             for n in (2, 4)}
    for n, result in again.items():
        assert result["model_rel_err"] == 0.0 and "optimizer state not restored" not in \
            result["stdout"], n
    a, b = (_flat(dist_checkpointing.load_plain_tensors(
        str(tmp_path / f"dp{n}" / "again" / "checkpoints" / "step_0000004"))) for n in (2, 4))
    assert set(a) == set(b) and sum("exp_avg_sq" in k for k in a) > 10
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    at_ep2 = launch(2, "load", ckpt, ref, tmp_path / "ep2" / "out", "parallel.ep=2")
    assert at_ep2["model_rel_err"] == 0.0
    assert "optimizer state not restored: saved dp_reshardable at TP1 PP1 VPP1 EP1 ETP1" in \
        at_ep2["stdout"]


def test_megatron_checkpoint_goes_to_deepspeed_through_the_consolidated_format(big, tmp_path):
    out, _ = big
    exported = consolidated.export(out / "checkpoints" / "step_0000004", tmp_path / "export")
    r = launch(2, "import", exported, out / "outputs.npz", tmp_path / "ds" / "out",
               "parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.zero=deepspeed",
               "parallel.zero_stage=2")
    assert r["step"] == 0 and r["model_rel_err"] <= TOL and r["ema_rel_err"] <= TOL, r


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def test_deepspeed_zero2_resume_and_exchange_with_megatron(tmp_path, ctx):
    """DeepSpeed ZeRO-2 at TP2xDP2 with EP2 (expert parameter groups over expert-DP) resumes
    exactly; its checkpoint goes through the consolidated format to megatron's backend at TP2
    with identical outputs; export -> import -> export is bit-identical."""
    out = tmp_path / "ds" / "out"
    r = launch(4, "resume", out, "parallel.tp=2", "parallel.ep=2", "parallel.zero=deepspeed",
               "parallel.zero_stage=2")
    assert r["full"] == r["resumed"]
    first = consolidated.export(out / "checkpoints" / "step_0000004", tmp_path / "first")
    imported = tmp_path / "imported" / "out"
    r = launch(2, "import", first, out / "outputs.npz", imported, "parallel.tp=2",
               "parallel.ep=1", "parallel.zero=megatron", "parallel.zero_stage=1")
    assert r["step"] == 0 and r["model_rel_err"] <= TOL and r["ema_rel_err"] <= TOL, r
    second = consolidated.export(imported / "checkpoints" / "step_0000000", tmp_path / "second")
    assert (first / exported_files.WEIGHTS).read_bytes() == \
        (second / exported_files.WEIGHTS).read_bytes()
    assert np.load(out / "outputs.npz")["ema"].shape == (4, 3, 16, 16)
