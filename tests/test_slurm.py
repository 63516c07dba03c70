"""examples/slurm/pretrain_ecdit.sbatch on a real single-node Slurm (scripts/slurm_local.sh
installs Debian's packages when missing and starts munged, slurmctld and slurmd).

  - sbatch with 2 srun tasks trains like torchrun at the same layout (DP2), to 1e-6;
  - `scancel --signal=USR1` mid-run: every rank saves and exits 75, the job requeues itself,
    its second attempt (SLURM_RESTART_COUNT=1) resumes from `latest` and finishes; the stitched
    losses equal an uninterrupted run bit for bit, both attempts' logs are kept, and the
    `finished` marker exists;
  - at the restart limit the job stops requeueing and says so;
  - a config that does not validate fails in the first seconds with the error in the log, and
    is not requeued.

Slurm holds a requeued batch job for about two minutes before it may start again; the test
makes it eligible at once (`scontrol update StartTime=now`), as an administrator could.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_jobs import (LAUNCHER_VARIABLES, ended, logs, losses, start_now, wait,
                        wait_for_rows)

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "examples/slurm/pretrain_ecdit.sbatch"
STEPS = 60


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm-state")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(SLURM_LOCAL_DIR=str(state), SLURM_CONF=str(state / "slurm.conf"))
    start = subprocess.run(["bash", str(ROOT / "scripts/slurm_local.sh"), "start"], env=env,
                           capture_output=True, text=True, timeout=900)
    assert start.returncode == 0, start.stdout + start.stderr
    yield env
    subprocess.run(["bash", str(ROOT / "scripts/slurm_local.sh"), "stop"], env=env, timeout=60)


def overrides(root: Path, out: str) -> list[str]:
    return ["model.hidden_size=32", "model.num_layers=4", "model.num_heads=2",
            "model.num_kv_heads=2", "moe.num_experts=4", "data.image_size=16",
            "train.micro_batch_size=2", "train.log_interval=50", "train.progress=false",
            "train.tensorboard=false", "diffusion.sample_steps=2",
            "train.sample_prompts=['a red circle']", "train.compute_map_prompts=1",
            "checkpoint.save_interval=0", f"train.steps={STEPS}",
            f"data.urls={root}/data/{{000000..000003}}.tar", "data.samples_per_shard=16",
            f"train.output_dir={root / out}"]


def submit(env: dict, root: Path, out: str, *extra: str, sbatch_env: dict | None = None) -> str:
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--chdir={root}",
           f"--job-name={out}", str(SBATCH), str(ROOT / "examples/configs/demo.yaml"),
           *overrides(root, out), *extra]
    result = subprocess.run(cmd, env={**env, "ECDIT_PYTHON": sys.executable,
                                      **(sbatch_env or {})},
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """An sbatch run and a torchrun run of the same layout, uninterrupted."""
    root = tmp_path_factory.mktemp("sbatch")
    job = submit(slurm, root, "whole")
    info = wait(slurm, job, ended)
    assert info["JobState"] == "COMPLETED", (info, (root / f"whole-{job}.out").read_text())
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "pretrain_ecdit.py"), "--config", str(ROOT / "examples/configs/demo.yaml"),
         *overrides(root, "torchrun")], cwd=root, capture_output=True, text=True, timeout=600,
        env=dict(slurm, OMP_NUM_THREADS="1"))
    assert torchrun.returncode == 0, torchrun.stdout[-2000:] + torchrun.stderr[-2000:]
    return root, job


def test_sbatch_with_two_tasks_equals_torchrun(runs):
    root, job = runs
    by_slurm, by_torchrun = losses(root / "whole"), losses(root / "torchrun")
    assert sorted(by_slurm) == sorted(by_torchrun) == list(range(1, STEPS + 1))
    assert max(abs(by_slurm[s] - by_torchrun[s]) / by_torchrun[s] for s in by_slurm) <= 1e-6
    assert json.loads((root / "whole" / "finished").read_text()) == {"step": STEPS}
    assert "finished" in (root / f"whole-{job}.out").read_text()


def test_preempted_job_requeues_itself_and_resumes_exactly(slurm, runs):
    root, whole_job = runs
    job = submit(slurm, root, "preempted")
    metrics = root / "preempted" / "metrics.jsonl"
    wait_for_rows(metrics, 5)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    # Requeued, the job passes through a terminal-looking state before it is pending again.
    wait(slurm, job, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING")
    start_now(slurm, job)
    second = root / "logs" / f"preempted-{job}-restart1.log"
    info = wait(slurm, job, lambda i: second.is_file() and ended(i))
    assert info["JobState"] == "COMPLETED", (info, (root / f"preempted-{job}.out").read_text())

    attempts = logs(root, "preempted", job)
    assert sorted(attempts) == [0, 1]  # both attempts' logs are kept
    stopped_at = [line for line in attempts[0].splitlines() if "stopped at step" in line]
    assert len(stopped_at) == 1, attempts[0][-2000:]
    step = int(stopped_at[0].split("stopped at step ")[1].split()[0])
    assert 5 <= step < STEPS
    assert f"resumed from {root / 'preempted' / 'checkpoints' / f'step_{step:07d}'}" in attempts[1]
    batch_log = (root / f"preempted-{job}.out").read_text()
    assert "requeueing (restart 1 of at most 20)" in batch_log and "finished" in batch_log
    assert losses(root / "preempted") == losses(root / "whole")  # bit for bit (fp32)
    assert json.loads((root / "preempted" / "finished").read_text()) == {"step": STEPS}


def test_a_finished_run_submitted_again_exits_at_once(slurm, runs):
    root, _ = runs
    job = submit(slurm, root, "whole")
    info = wait(slurm, job, ended)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0"
    assert f"already finished at step {STEPS}: nothing to do" in logs(root, "whole", job)[0]


def test_restart_limit_stops_requeueing(slurm, tmp_path):
    job = submit(slurm, tmp_path, "limited", "train.exit_duration_minutes=0.0001",
                 sbatch_env={"ECDIT_MAX_RESTARTS": "0"})
    info = wait(slurm, job, ended)
    assert info["Restarts"] == "0" and info["ExitCode"].startswith("75:"), info
    assert "the restart limit (0) is reached: not requeueing" in \
        (tmp_path / f"limited-{job}.out").read_text()
    assert "stopped at step 1 (time limit reached)" in logs(tmp_path, "limited", job)[0]


def test_a_bad_config_fails_at_once_and_is_not_requeued(slurm, tmp_path):
    started = time.time()
    job = submit(slurm, tmp_path, "bad", "moe.num_experts=7", "parallel.ep=2")
    info = wait(slurm, job, ended)
    # Each rank exits 2; srun --kill-on-bad-exit may end the slower one first and report its
    # SIGTERM (143) instead, so the job's code is not checked, only that it failed at once.
    assert info["Restarts"] == "0" and info["JobState"] == "FAILED", info
    log = logs(tmp_path, "bad", job)[0]
    assert "config error: moe.num_experts=7 is not divisible by parallel.ep=2" in log
    assert "Traceback" not in log
    assert ": not requeued" in (tmp_path / f"bad-{job}.out").read_text()
    assert time.time() - started < 60
