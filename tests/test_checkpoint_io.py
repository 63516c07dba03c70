"""Checkpoints at scale, measured under gloo on this machine, and the ways a save goes wrong.

- At 8 ranks (TP2 x PP2 x DP2, and EP4 x DP8, expert-DP 2), with a model whose dense weights are
  worth balancing: every rank writes about as much (fully parallel save: max / mean <= 1.3,
  from each rank's files `__<rank>_<n>.distcp`); a load reads the checkpoint about once (the
  bytes through read() during a load, /proc/self/io's rchar, summed over ranks <= 1.3x the
  files); a save adds at most 1.5x what a rank writes (+ 32 MB) to its peak memory.
- The planner's checkpoint figures for both runs equal the files per rank within 5%.
- A full file system (a small tmpfs, as root): one line that says so, exit 1, nothing left
  behind, `latest` at the previous checkpoint, and a resume once there is space. A crash in the
  middle of a save leaves nothing once a later save completes. Ranks handed another `latest`
  load rank 0's; a rank that cannot read it stops every rank with one error naming it.
"""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

import check_checkpoints as cc  # noqa: E402
from conftest import run_in_own_session  # noqa: E402
from megatron_ecdit.checkpoint import distributed  # noqa: E402
from megatron_ecdit.parallel.layout import ParallelLayout  # noqa: E402
from megatron_ecdit.planning.checkpoints import Storage, checkpoint_plan  # noqa: E402
from megatron_ecdit.planning.params import rank_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IO = ROOT / "tests/distributed/check_checkpoint_io.py"
CHECK = ROOT / "tests/distributed/check_checkpoints.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1")
MODEL = ["model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=2",
         "moe.num_experts=8"]
LAYOUTS = {"TP2xPP2xDP2": ["parallel.tp=2", "parallel.pp=2"], "EP4": ["parallel.ep=4"]}


def torchrun(nproc: int, *args, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def rank_files(checkpoint: Path) -> dict[int, int]:
    """Bytes each rank wrote: its `__<rank>_<n>.distcp` files."""
    written: Counter = Counter()
    for file in checkpoint.iterdir():
        match = re.fullmatch(r"__(\d+)_\d+\.distcp", file.name)
        if match:
            written[int(match.group(1))] += file.stat().st_size
    return dict(written)


def folder_bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint.iterdir())


@pytest.fixture(scope="module")
def io(tmp_path_factory):
    root = tmp_path_factory.mktemp("io")
    runs = {}
    for name, layout in LAYOUTS.items():
        out = root / name / "out"
        torchrun(8, IO, out, *MODEL, *layout)
        reports = [json.loads((out / "io" / f"rank{r}.json").read_text()) for r in range(8)]
        runs[name] = (Path(reports[0]["path"]), reports)
    return runs


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_rank_writes_about_as_much(io, name):
    checkpoint, _ = io[name]
    written = rank_files(checkpoint)
    assert sorted(written) == list(range(8))
    mean = sum(written.values()) / 8
    print(f"\n{name}: {folder_bytes(checkpoint) / 1e6:.1f} MB; MB per rank "
          f"{[round(b / 1e6, 1) for b in written.values()]}, max/mean "
          f"{max(written.values()) / mean:.2f}")
    assert max(written.values()) / mean <= 1.3


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_load_reads_the_checkpoint_about_once(io, name):
    checkpoint, reports = io[name]
    assert {r["loaded_step"] for r in reports} == {2}
    read = sum(r["load_rchar"] for r in reports)
    print(f"\n{name}: read {read / 1e6:.1f} MB for {folder_bytes(checkpoint) / 1e6:.1f} MB "
          f"({read / folder_bytes(checkpoint):.2f}x)")
    assert read <= 1.3 * folder_bytes(checkpoint)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_save_adds_little_memory(io, name):
    checkpoint, reports = io[name]
    written = rank_files(checkpoint)
    for rank, r in enumerate(reports):
        for save in ("first_save", "save"):
            added = r[f"{save}_added_rss"]
            assert added <= 1.5 * written[rank] + (32 << 20), (rank, save, added)
        assert r["save_wchar"] >= 0.9 * written[rank]  # the counters see the writes


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_planner_predicts_the_bytes_each_rank_writes(io, name):
    """The second save of each 8-rank run above, against `checkpoint_plan` for its config."""
    checkpoint, reports = io[name]
    written = rank_files(checkpoint)
    cfg = cc.config(checkpoint.parent.parent, [*MODEL, *LAYOUTS[name]])
    saved = reports[0]["config"]
    for key in ("in_channels", "input_size", "text_dim"):  # as the job derived them
        setattr(cfg.model, key, saved["model"][key])
    cfg.train.precision = saved["train"]["precision"]
    lay = ParallelLayout.build(cfg, 8)
    stages = [rank_params(cfg.model, cfg.moe, tp=lay.tp, pp=lay.pp, vpp=lay.vpp, ep=lay.ep,
                          etp=lay.etp, pp_rank=r) for r in range(lay.pp)]
    plan = checkpoint_plan(lay, stages, cfg.train.precision, 8, Storage(), 1.0)
    per_stage = 8 // lay.pp
    for rank, size in written.items():
        predicted = plan.rank_bytes[rank // per_stage]
        assert abs(size - predicted) <= 0.05 * size, (rank, size, predicted)


def test_a_full_disk_ends_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A tmpfs that holds one checkpoint of the tiny model but not two: the second save is
    refused before anything is written; with room again, the run resumes from the first."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "out"
        args = [f"train.output_dir={out}", f"data.urls={tmp_path}/data/{{000000..000003}}.tar",
                "train.steps=4", "checkpoint.save_interval=2"]
        result = pretrain(args)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "the disk is full" in lines[0] and str(out / "checkpoints") in lines[0]
        root = out / "checkpoints"
        assert distributed.latest_checkpoint(root).name == "step_0000002"
        assert not list(root.glob(".tmp-*")) and not (root / "step_0000004").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        result = pretrain(args)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "resumed from" in result.stdout and "step 2" in result.stdout
        assert distributed.latest_checkpoint(root).name == "step_0000004"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_write_that_fails_is_cleaned_up_and_says_the_disk_is_full(tmp_path, ctx,
                                                                    monkeypatch):
    """The same on a tmpfs when the space check is passed and megatron's writer itself hits
    ENOSPC (the error every rank raises)."""
    from megatron_ecdit.training.trainer import Job

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        monkeypatch.setattr(distributed.Checkpointer, "_check_space", lambda *a: None)
        data = f"data.urls={tmp_path}/data/{{000000..000003}}.tar"
        job = Job(cc.config(disk / "out", ["train.resume=never", data]))
        with pytest.raises(distributed.SaveError, match=r"step_0000001 failed: the disk is full"):
            job.save(1)
        assert not list((disk / "out" / "checkpoints").glob("*step*"))
        # asynchronously: the failure is seen when the save is finalized
        job = Job(cc.config(disk / "out", ["train.resume=never", data,
                                           "checkpoint.async_save=true"]))
        job.save(1)
        with pytest.raises(distributed.SaveError, match=r"step_0000001 failed: the disk is full"):
            job.checkpointer.finalize(blocking=True)
        assert not list((disk / "out" / "checkpoints").glob("*step*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def pretrain(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pretrain_ecdit.py"), *cc.TINY, *args],
                          capture_output=True, text=True, env=ENV, timeout=600)


def test_a_crash_mid_save_leaves_nothing_once_a_later_save_completes(tmp_path):
    out = tmp_path / "out"
    data = [f"data.urls={tmp_path}/data/{{000000..000003}}.tar"]
    code = cc_run("killsave", 3, out, "checkpoint.save_interval=1", *data)
    assert code == -9
    root = out / "checkpoints"
    assert (root / ".tmp-step_0000003").is_dir()
    assert distributed.latest_checkpoint(root).name == "step_0000002"
    assert cc_run("killsave", 0, out, "checkpoint.save_interval=2", "train.steps=4",
                  *data) == 0
    assert distributed.latest_checkpoint(root).name == "step_0000004"
    assert not list(root.glob(".tmp-*"))


def cc_run(*args) -> int:
    return run_in_own_session([sys.executable, str(CHECK), *map(str, args)], ENV)


def test_every_rank_loads_rank_0s_latest_or_stops_with_one_error(tmp_path):
    result = torchrun(2, CHECK, "race", tmp_path / "out", timeout=600)
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    assert r["loaded"] == [2, 2]
    assert len(set(r["errors"])) == 1 and r["errors"][0] is not None
    assert r["errors"][0].startswith("rank 1 cannot load the checkpoint rank 0 chose")
    assert "simulated" in r["errors"][0]
