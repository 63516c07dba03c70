"""Multi-process layouts over gloo equal one process on the same weights and global batch.

Each torchrun launch checks several layouts (start-up dominates on CPU). Per layout, to 1e-5
relative in fp32: the loss and every gathered gradient of one forward/backward (layouts without
pipelining); then the losses of 3 AdamW steps with gradient clipping, through megatron-core's
DDP + distributed optimizer (ZeRO-1) or DeepSpeed ZeRO-1/2/3, and through megatron-core's
pipeline schedules where PP > 1 (1F1B; interleaved with VPP), and every parameter after them,
against torch.optim.AdamW in one process. Pipeline layouts also check that the conditioning
embedders replicated on every stage stay identical.
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


LAUNCHES = {  # the data-parallel degree is what the world size leaves
    2: [{}, {"tp": 2}, {"tp": 2, "sp": True}, {"ep": 2}, {"pp": 2},
        {"zero": "deepspeed", "zero_stage": 1}, {"zero": "deepspeed", "zero_stage": 2},
        {"zero": "deepspeed", "zero_stage": 3}],
    4: [{"ep": 4}, {"tp": 2}, {"tp": 2, "ep": 2}, {"tp": 2, "sp": True, "ep": 2},
        {"tp": 2, "zero": "deepspeed", "zero_stage": 2},
        {"tp": 2, "ep": 2, "zero": "deepspeed", "zero_stage": 2},
        {"pp": 4, "vpp": 2, "model.num_layers": 8}, {"tp": 2, "pp": 2}, {"pp": 2, "ep": 2}],
    8: [{"tp": 2, "pp": 2}, {"pp": 2, "ep": 2}],  # TP2xPP2xDP2; PP2xEP2xDP4 (expert-DP 2)
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
    assert r["train_norm_rel_err"] <= TOL, r  # the norm each backend clips with
    assert r["train_param_rel_err"] <= TOL, r
    if LAUNCHES[nproc][index].get("pp", 1) > 1:
        assert r["embedder_replica_max_diff"] == 0.0, r
