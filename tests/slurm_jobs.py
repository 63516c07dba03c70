"""Submitting and following jobs on the local Slurm of scripts/slurm_local.sh, for
tests/test_slurm.py (one node) and tests/test_slurm_nodes.py (several)."""

import json
import subprocess
import time
from pathlib import Path

# A launcher's variables of this test process (its own one-process world) must not reach the
# jobs: sbatch exports the environment, and an inherited MASTER_PORT is taken.
LAUNCHER_VARIABLES = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                      "LOCAL_WORLD_SIZE"}


def job_info(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                         text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


NEVER_STARTS = {"PartitionConfig", "BadConstraints", "ReqNodeNotAvail", "PartitionNodeLimit"}


def wait(env: dict, job: str, until, timeout: float = 300) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, job)
        if until(info):
            return info
        if info.get("JobState") == "PENDING" and info.get("Reason") in NEVER_STARTS:
            raise AssertionError(f"job {job} can never start on this cluster: {info}")
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not get there in {timeout} s: {job_info(env, job)}")


def start_now(env: dict, job: str) -> None:
    """Make a requeued job eligible at once, as an administrator could, once the node has
    cleaned up after its last run. slurmd revokes a requeued job's credential by the second:
    started again within the second of its requeue, the job is killed with "Job credential
    revoked" (measured when the first run ended quickly)."""
    deadline = time.time() + 60
    while time.time() < deadline and subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
            text=True).stdout.strip() != "idle":  # every node idle
        time.sleep(0.5)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env)


def wait_for_rows(metrics: Path, rows: int, timeout: float = 300) -> None:
    """Until the job's metrics.jsonl has `rows` steps (then it is past start-up)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.2)
    raise AssertionError(f"{metrics} did not reach {rows} steps in {timeout} s")


def ended(info: dict) -> bool:
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").open())}


def logs(root: Path, name: str, job: str) -> dict[int, str]:
    return {int(p.stem.rsplit("restart", 1)[1]): p.read_text()
            for p in (root / "logs").glob(f"{name}-{job}-restart*.log")}
