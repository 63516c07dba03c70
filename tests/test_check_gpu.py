"""benchmarks/gpu/check_gpu.py without a GPU: `--device cpu --tiny` runs every check at the
demo's size on the CPU, so the GPU check is ready to run whenever a GPU is at hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = {"tiny model", "XL models", "XL step", "XL phases", "no host sync", "EC vs dense",
          "bf16 vs fp32", "training job"}


def test_gpu_check_passes_on_the_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items()  # the script starts its own one-process world
           if k not in ("MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/check_gpu.py"),
                           "--device", "cpu", "--tiny", "--threads", "1", "--out", str(out)],
                          cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert not report["failed"]
    rows = report["rows"]
    assert {row["check"] for row in rows} == CHECKS | {"total"}
    verdicts = {}
    for row in rows:
        if row["status"]:
            verdicts.setdefault(row["check"], []).append(row["status"])
    # Every check with a verdict gave one per item; none raised (a raise is a FAILED row).
    assert verdicts == {"tiny model": ["ok"], "no host sync": ["ok", "ok"],
                        "bf16 vs fp32": ["ok", "ok", "ok"], "training job": ["ok", "ok"]}
