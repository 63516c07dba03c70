"""examples/slurm/pretrain_ecdit.sbatch across two nodes of a real Slurm: `scripts/slurm_local.sh
start --nodes 2` runs one slurmctld and two slurmd, each in its own network namespace (its own
address on a bridge, no route out) and host name, sharing this machine's filesystem.

  - `sbatch --nodes=2 --ntasks-per-node=2` at TP2 x DP2 (TP inside a node) trains like a
    one-node torchrun of the same layout, to 1e-6, and the log names both hosts;
  - the torchrun-per-node mode (ECDIT_LAUNCHER=torchrun) too;
  - one job through three faults, each ending in a requeue and a resume from `latest`: a
    `scancel --signal=USR1` (every rank saves), then the second node's tasks killed (SIGKILL, a
    lost node: the job ends within parallel.collective_timeout_s + 30 s), then a rank stopped
    (SIGSTOP: its peers' watchdogs fire after train.hang_timeout_s); the batch log says why each
    time, and the stitched losses equal the uninterrupted two-node run bit for bit;
  - `stop --nodes 2` removes every namespace, link and /etc/hosts line the start made.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_jobs import (LAUNCHER_VARIABLES, ended, logs, losses, start_now, wait,
                        wait_for_rows)

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = ["bash", str(ROOT / "scripts/slurm_local.sh")]
SBATCH = ROOT / "examples/slurm/pretrain_ecdit.sbatch"
STEPS = 30
# With room for a loaded machine (with another test suite beside it a save took over 12 s);
# the watchdog still comes first for a stopped rank.
HANG_S, COLLECTIVE_S, MARGIN_S = 20, 60, 30
MARK = "# megatron_ecdit virtual node"


def virtual_network() -> dict[str, list[str]]:
    """What the cluster adds to this machine: namespaces, links and /etc/hosts lines."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {"netns": [n.split()[0] for n in netns.splitlines() if n.startswith("ecn")],
            "links": [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
                      if line.split(":")[1].strip().startswith(("ecbr", "ecv"))],
            "hosts": [line for line in Path("/etc/hosts").read_text().splitlines()
                      if MARK in line]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm-nodes")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(SLURM_LOCAL_DIR=str(state / "slurm"), SLURM_CONF=str(state / "slurm-nodes/slurm.conf"))
    start = subprocess.run([*SLURM_LOCAL, "start", "--nodes", "2"], env=env,
                           capture_output=True, text=True, timeout=900)
    assert start.returncode == 0, start.stdout + start.stderr
    yield env
    subprocess.run([*SLURM_LOCAL, "stop", "--nodes", "2"], env=env, timeout=60)


def overrides(root: Path, out: str) -> list[str]:
    return ["model.hidden_size=32", "model.num_layers=4", "model.num_heads=2",
            "model.num_kv_heads=2", "moe.num_experts=4", "data.image_size=16",
            "parallel.tp=2", "train.micro_batch_size=2", "train.log_interval=10",
            "train.progress=false", "train.tensorboard=false", "diffusion.sample_steps=2",
            "train.sample_prompts=['a red circle']", "train.compute_map_prompts=0",
            "checkpoint.save_interval=10", f"train.steps={STEPS}",
            f"train.hang_timeout_s={HANG_S}", f"parallel.collective_timeout_s={COLLECTIVE_S}",
            f"data.urls={root}/data/{{000000..000003}}.tar", "data.samples_per_shard=16",
            f"train.output_dir={root / out}"]


def submit(env: dict, root: Path, out: str, launcher: str = "srun") -> str:
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", f"--chdir={root}",
           f"--job-name={out}", str(SBATCH), str(ROOT / "examples/configs/demo.yaml"),
           *overrides(root, out)]
    result = subprocess.run(cmd, env={**env, "ECDIT_PYTHON": sys.executable,
                                      "ECDIT_LAUNCHER": launcher},
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def completed(env: dict, root: Path, out: str, job: str) -> None:
    info = wait(env, job, ended)
    assert info["JobState"] == "COMPLETED", (info, (root / f"{out}-{job}.out").read_text())


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The uninterrupted two-node run (srun) and a one-node torchrun of the same layout."""
    root = tmp_path_factory.mktemp("nodes")
    job = submit(cluster, root, "whole")
    completed(cluster, root, "whole", job)
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(ROOT / "pretrain_ecdit.py"), "--config", str(ROOT / "examples/configs/demo.yaml"),
         *overrides(root, "torchrun")], cwd=root, capture_output=True, text=True, timeout=600,
        env=dict(cluster, OMP_NUM_THREADS="1"))
    assert torchrun.returncode == 0, torchrun.stdout[-2000:] + torchrun.stderr[-2000:]
    return root, job


def assert_close(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert max(abs(a[s] - b[s]) / b[s] for s in a) <= 1e-6


def test_two_nodes_by_srun_equal_one_node_torchrun(runs):
    root, job = runs
    assert_close(losses(root / "whole"), losses(root / "torchrun"))
    log = logs(root, "whole", job)[0]
    assert "4 ranks on 2 hosts: ecn1: ranks 0, 1; ecn2: ranks 2, 3" in log
    assert "finished" in (root / f"whole-{job}.out").read_text()


def test_torchrun_per_node_equals_one_node_torchrun(cluster, runs):
    root, _ = runs
    job = submit(cluster, root, "per-node", launcher="torchrun")
    completed(cluster, root, "per-node", job)
    assert_close(losses(root / "per-node"), losses(root / "torchrun"))
    assert "4 ranks on 2 hosts: ecn1: ranks 0, 1; ecn2: ranks 2, 3" in \
        logs(root, "per-node", job)[0]


def tasks_on(node: str) -> dict[int, int]:
    """The training tasks running in a node's namespace: {SLURM_PROCID: pid}."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True,
                          text=True).stdout.split()
    tasks = {}
    for pid in map(int, pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pretrain_ecdit.py" in cmdline and b"srun" not in cmdline:
            rank = [v for v in environ if v.startswith(b"SLURM_PROCID=")]
            tasks[int(rank[0].split(b"=")[1])] = pid
    return tasks


def running_steps(job: str, log: Path, metrics: Path, steps: int) -> None:
    """Wait until the attempt logging to `log` has resumed and run `steps` more steps, with
    both of the second node's tasks up."""
    deadline, rows = time.time() + 300, None
    while time.time() < deadline:
        if rows is None and log.is_file() and "resumed from" in log.read_text():
            rows = len(metrics.read_text().splitlines())
        if rows is not None and len(metrics.read_text().splitlines()) >= rows + steps \
                and len(tasks_on("ecn2")) == 2:
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not run {steps} steps after resuming: {log}")


def requeued(env: dict, job: str, restarts: int) -> float:
    """Wait for the job's requeue number `restarts`; make it start again; the seconds taken."""
    started = time.time()
    wait(env, job, lambda i: i.get("Restarts") == str(restarts) and i.get("JobState") == "PENDING")
    taken = time.time() - started
    start_now(env, job)
    return taken


@pytest.fixture(scope="module")
def faulted(cluster, runs):
    """One two-node job through three faults: preempted, a node lost, a rank stopped."""
    root, _ = runs
    job = submit(cluster, root, "faulted")
    metrics = root / "faulted" / "metrics.jsonl"
    wait_for_rows(metrics, 5)
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster, check=True)
    requeued(cluster, job, 1)

    log = root / "logs" / f"faulted-{job}-restart1.log"
    running_steps(job, log, metrics, 3)
    for pid in tasks_on("ecn2").values():
        os.kill(pid, signal.SIGKILL)
    lost_after = requeued(cluster, job, 2)

    log = root / "logs" / f"faulted-{job}-restart2.log"
    running_steps(job, log, metrics, 3)
    os.kill(tasks_on("ecn2")[3], signal.SIGSTOP)
    hung_after = requeued(cluster, job, 3)

    last = root / "logs" / f"faulted-{job}-restart3.log"
    info = wait(cluster, job, lambda i: last.is_file() and ended(i))
    assert info["JobState"] == "COMPLETED", (info, (root / f"faulted-{job}.out").read_text())
    return root, job, lost_after, hung_after


def test_a_preempted_two_node_job_requeues_and_resumes(faulted):
    root, job, _, _ = faulted
    attempt = logs(root, "faulted", job)[0]
    assert len([line for line in attempt.splitlines() if "stopped at step" in line]) == 1
    assert "stopped early after saving: requeueing (restart 1 of at most 20)" in \
        (root / f"faulted-{job}.out").read_text()


def test_a_lost_node_ends_the_job_fast_and_it_requeues(faulted):
    root, job, lost_after, _ = faulted
    assert lost_after <= COLLECTIVE_S + MARGIN_S
    attempt = logs(root, "faulted", job)[1]
    assert "a collective failed, a peer is lost or stuck" in attempt
    batch_log = (root / f"faulted-{job}.out").read_text()
    assert "a rank lost a peer or hung (" in batch_log
    assert "requeueing (restart 2 of at most 20)" in batch_log


def test_a_stopped_rank_is_caught_by_the_watchdog_and_the_job_requeues(faulted):
    root, job, _, hung_after = faulted
    assert hung_after <= HANG_S + MARGIN_S
    attempt = logs(root, "faulted", job)[2]
    assert "no step finished for" in attempt and f"train.hang_timeout_s={HANG_S}" in attempt
    assert "Thread 0x" in attempt  # faulthandler's dump of every thread
    assert "requeueing (restart 3 of at most 20)" in (root / f"faulted-{job}.out").read_text()


def test_the_job_through_three_faults_equals_the_uninterrupted_one_bit_for_bit(faulted):
    root, job, _, _ = faulted
    assert losses(root / "faulted") == losses(root / "whole")
    assert "finished" in (root / f"faulted-{job}.out").read_text()


def test_stop_removes_every_namespace_link_and_hosts_line(cluster):
    assert virtual_network() == {
        "netns": ["ecn1", "ecn2"], "links": ["ecbr0", "ecv1", "ecv2"],
        "hosts": [f"198.18.0.1 ecctl {MARK}", f"198.18.0.11 ecn1 {MARK}",
                  f"198.18.0.12 ecn2 {MARK}"]}
    stop = subprocess.run([*SLURM_LOCAL, "stop", "--nodes", "2"], env=cluster,
                          capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert virtual_network() == {"netns": [], "links": [], "hosts": []}
