"""Slow, stopped and lost ranks, for real, under torchrun or as separate processes (as srun
starts them), at DP2:

  - the straggler fields of metrics.jsonl name a rank that is slowed on purpose (stopped with
    SIGSTOP 150 ms in every 170: its own work in a step takes several times its peer's);
  - a rank stopped for good (SIGSTOP) is caught by its peer's watchdog, which dumps every
    thread's stack and exits 75 within train.hang_timeout_s plus a margin;
  - a rank killed (SIGKILL, a lost node) makes its peer's collective fail, and the peer exits
    75 within parallel.collective_timeout_s plus a margin;
  - each time the log says why and ends with the line the SLURM script requeues on, and the
    run resumed from `latest` equals an uninterrupted one bit for bit.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from megatron_ecdit.checkpoint import consolidated
from megatron_ecdit.checkpoint.exported import WeightsFolder
from megatron_ecdit.training.watchdog import RESUME_HINT

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
HANG_S, COLLECTIVE_S, MARGIN_S = 4, 20, 30
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2"]


def overrides(out: Path, data: Path, *extra: str) -> list[str]:
    return ["model.hidden_size=32", "model.num_layers=4", "model.num_heads=2",
            "model.num_kv_heads=2", "moe.num_experts=4", "data.image_size=16",
            "train.micro_batch_size=2", f"train.steps={STEPS}", "train.log_interval=1",
            "train.progress=false", "train.tensorboard=false",
            "train.sample_prompts=['a red circle']", "train.compute_map_prompts=0",
            "diffusion.sample_steps=2", "checkpoint.save_interval=2", "checkpoint.keep_last=2",
            f"data.urls={data}/{{000000..000001}}.tar", "data.samples_per_shard=16",
            f"train.output_dir={out}", *extra]


def run(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    assert code == 0, log.read_text()[-3000:]


def worker_with_rank(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker below `parent` whose RANK is `rank`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if f"RANK={rank}".encode() in environ and ppid == parent:
            return int(entry.name)
    return None


def wait_for_step(out: Path, step: int, proc: subprocess.Popen) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").open())}


def final_weights(out: Path, tmp: Path) -> dict[str, np.ndarray]:
    folder = consolidated.export(out / "checkpoints" / f"step_{STEPS:07d}", tmp,
                                 weights="model", progress=False)
    exported = WeightsFolder(folder)
    return {name: exported.read(name).numpy() for name in exported.names}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    out = root / "uninterrupted"
    run([*TORCHRUN, str(ROOT / "pretrain_ecdit.py"), *overrides(out, root / "data")],
        root / "uninterrupted.log")
    return root, losses(out), final_weights(out, root / "uninterrupted-export")


def resumes_to_the_reference(reference, out: Path, log: Path) -> None:
    root, ref_losses, ref_weights = reference
    run([*TORCHRUN, str(ROOT / "pretrain_ecdit.py"), *overrides(out, root / "data")], log)
    assert "resumed from" in log.read_text()
    assert losses(out) == ref_losses
    weights = final_weights(out, out.parent / f"{out.name}-export")
    assert sorted(weights) == sorted(ref_weights)
    assert all(np.array_equal(weights[k], ref_weights[k]) for k in weights)


def test_the_straggler_fields_name_a_rank_slowed_on_purpose(reference):
    root = reference[0]
    out = root / "slowed"
    proc = subprocess.Popen([*TORCHRUN, str(ROOT / "pretrain_ecdit.py"),
                             *overrides(out, root / "data", "model.hidden_size=64",
                                        "train.micro_batch_size=8", "train.steps=12",
                                        "checkpoint.save_interval=0")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    slow = None
    try:
        while slow is None and proc.poll() is None:
            slow = worker_with_rank(proc.pid, 1)
            time.sleep(0.05)
        assert slow is not None, proc.communicate()[0][-3000:]
        wait_for_step(out, 1, proc)  # start-up at full speed
        while proc.poll() is None:  # rank 1 runs 20 ms in every 170: shorter than its work
            os.kill(slow, signal.SIGSTOP)
            time.sleep(0.15)
            os.kill(slow, signal.SIGCONT)
            time.sleep(0.02)
    except ProcessLookupError:
        pass  # the worker exited
    finally:
        try:
            os.kill(slow, signal.SIGCONT)
        except (ProcessLookupError, TypeError):
            pass
        log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, 13))
    host = socket.gethostname()
    for r in records:
        assert r["straggler/slowest_host"] == r["straggler/fastest_host"] == host
        assert {r["straggler/slowest_rank"], r["straggler/fastest_rank"]} == {0, 1}
    later = records[3:]  # past start-up
    named = [r for r in later if r["straggler/slowest_rank"] == 1]
    assert len(named) >= 0.8 * len(later), [(r["straggler/slowest_rank"],
                                             r["straggler/slowest_s"]) for r in later]
    ratios = sorted(r["straggler/slowest_s"] / r["straggler/fastest_s"] for r in named)
    assert ratios[len(ratios) // 2] > 1.5, ratios
    assert f"slowest rank 1 ({host})" in log


def test_a_stopped_rank_is_caught_by_the_watchdog_and_the_run_resumes_bit_for_bit(reference):
    root = reference[0]
    out, log = root / "stopped", root / "stopped.log"
    with log.open("w") as f:
        proc = subprocess.Popen([*TORCHRUN, str(ROOT / "pretrain_ecdit.py"),
                                 *overrides(out, root / "data", f"train.hang_timeout_s={HANG_S}")],
                                stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_for_step(out, 5, proc)
        ranks = [worker_with_rank(proc.pid, r) for r in (0, 1)]
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        while alive(ranks[0]) and time.monotonic() - stopped < HANG_S + MARGIN_S + 30:
            time.sleep(0.1)
        waited = time.monotonic() - stopped
    finally:
        for pid in ranks:  # the stopped rank never comes back
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
    text = log.read_text()
    assert waited < HANG_S + MARGIN_S, (waited, text[-3000:])
    assert f"rank 0: no step finished for" in text and "(most recent call first)" in text
    assert f"exiting with 75, {RESUME_HINT}" in text
    resumes_to_the_reference(reference, out, log)


def test_a_killed_rank_makes_its_peer_exit_75_and_the_run_resumes_bit_for_bit(reference):
    """Two processes as srun starts them (no torchrun to tear the other down): the survivor's
    collective fails, it exits 75 with the line the batch script requeues on."""
    root = reference[0]
    out = root / "killed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = [root / f"killed-rank{r}.log" for r in (0, 1)]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        with logs[rank].open("w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "pretrain_ecdit.py"),
                 *overrides(out, root / "data", f"parallel.collective_timeout_s={COLLECTIVE_S}",
                            "train.hang_timeout_s=0")],
                stdout=f, stderr=subprocess.STDOUT, env=env))
    try:
        wait_for_step(out, 5, procs[0])
        procs[1].kill()
        killed = time.monotonic()
        code = procs[0].wait(timeout=COLLECTIVE_S + MARGIN_S + 30)
        waited = time.monotonic() - killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    text = logs[0].read_text()
    assert code == 75 and waited < COLLECTIVE_S + MARGIN_S, (code, waited, text[-3000:])
    assert "rank 0: a collective failed, a peer is lost or stuck (" in text
    assert f"exiting with 75, {RESUME_HINT}" in text
    resumes_to_the_reference(reference, out, root / "killed-resumed.log")
