"""The straggler fields of metrics.jsonl name a rank that is slowed on purpose: a DP2 run
under torchrun whose rank 1 is stopped (SIGSTOP) for most of the time and continued in short
windows, so that its own work in a step takes several times its peer's."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24


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


def test_the_straggler_fields_name_a_rank_slowed_on_purpose(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "pretrain_ecdit.py"), "model.hidden_size=64", "model.num_layers=4",
           "model.num_heads=2", "model.num_kv_heads=2", "moe.num_experts=4",
           "data.image_size=16", "train.micro_batch_size=4", f"train.steps={STEPS}",
           "train.log_interval=1", "train.progress=false", "train.tensorboard=false",
           "train.sample_prompts=['a red circle']", "train.compute_map_prompts=0",
           "diffusion.sample_steps=2", "checkpoint.save_interval=0",
           f"data.urls={tmp_path}/data/{{000000..000001}}.tar", "data.samples_per_shard=16",
           f"train.output_dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    slow = None
    try:
        while slow is None and proc.poll() is None:
            slow = worker_with_rank(proc.pid, 1)
            time.sleep(0.05)
        assert slow is not None, proc.communicate()[0][-3000:]
        while proc.poll() is None:  # rank 1 runs 50 ms in every 200
            os.kill(slow, signal.SIGSTOP)
            time.sleep(0.15)
            os.kill(slow, signal.SIGCONT)
            time.sleep(0.05)
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
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
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
