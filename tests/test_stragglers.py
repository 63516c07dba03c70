"""The straggler fields of metrics.jsonl, for real, under torchrun at DP2: they name a rank that
is slowed on purpose (stopped with SIGSTOP 150 ms in every 170: its own work in a step takes
several times its peer's).

Stopped and lost ranks (the watchdog, the collective timeout, exit 75 and the resume) are
tested on a two-node Slurm job in tests/test_slurm_nodes.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
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


def test_the_straggler_fields_name_a_rank_slowed_on_purpose(tmp_path):
    root = tmp_path
    out = root / "slowed"
    proc = subprocess.Popen([*TORCHRUN, str(ROOT / "pretrain_ecdit.py"),
                             *overrides(out, root / "data", "model.hidden_size=64",
                                        "train.micro_batch_size=8",
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
