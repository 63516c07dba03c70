"""Multi-process layouts over gloo: loss and gradients equal the single-process model's.

One torchrun launch checks several layouts (start-up dominates on CPU). Each layout's loss and
every gathered gradient must match a single-process model on the same weights and global batch
to 1e-5 relative (fp32).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def run_layouts(nproc: int, layouts: list[dict]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), str(ROOT / "tests/distributed/check_layouts.py"),
           json.dumps(layouts)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line[len("RESULT "):]) for line in result.stdout.splitlines()
            if line.startswith("RESULT ")]


LAYOUTS = [{"tp": 2}, {"tp": 2, "sp": True}, {"ep": 2}, {"ep": 4}, {"tp": 2, "ep": 2},
           {"tp": 2, "sp": True, "ep": 2}]


@pytest.fixture(scope="module")
def results():
    return run_layouts(4, LAYOUTS)


def test_every_layout_ran(results):
    assert [r["layout"] for r in results] == LAYOUTS


@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=[json.dumps(x) for x in LAYOUTS])
def test_layout_matches_single_process(results, index):
    r = results[index]
    assert r["loss_rel_err"] <= TOL, r
    assert r["grad_rel_err"] <= TOL, r
