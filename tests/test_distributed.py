"""Multi-process layouts over gloo equal one process on the same weights and global batch.

Each torchrun launch checks several layouts (start-up dominates on CPU). Per layout, to 1e-5
relative in fp32: the loss and every gathered gradient of one forward/backward; then the losses
of 3 AdamW steps with gradient clipping through megatron-core's DDP + distributed optimizer
(ZeRO-1) and every parameter after them, against torch.optim.AdamW in one process.
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


LAUNCHES = {
    2: [{}, {"tp": 2}, {"tp": 2, "sp": True}, {"ep": 2}],  # DP2, TP2, TP2+SP, EP2 (x DP2)
    4: [{"ep": 4}, {"tp": 2}, {"tp": 2, "ep": 2}, {"tp": 2, "sp": True, "ep": 2}],
}
CASES = [(n, i) for n, layouts in LAUNCHES.items() for i in range(len(layouts))]


@pytest.fixture(scope="module")
def results():
    return {n: run_layouts(n, layouts) for n, layouts in LAUNCHES.items()}


def test_every_layout_ran(results):
    assert {n: [r["layout"] for r in rs] for n, rs in results.items()} == LAUNCHES


@pytest.mark.parametrize("nproc,index", CASES,
                         ids=[f"{n}procs-{json.dumps(LAUNCHES[n][i])}" for n, i in CASES])
def test_layout_matches_single_process(results, nproc, index):
    r = results[nproc][index]
    assert r["loss_rel_err"] <= TOL, r
    assert r["grad_rel_err"] <= TOL, r
    assert r["train_loss_rel_err"] <= TOL, r
    assert r["train_param_rel_err"] <= TOL, r
