"""The shard stream under torchrun: 4 gloo processes as TP2 x DP2, 2 DataLoader workers each.

One launch of tests/distributed/check_data.py checks: tensor-parallel peers get identical
batches and data-parallel ranks different ones; with resampled=False every sample reaches
exactly one DP rank per epoch; a resume after 5 batches gives exactly the next batches on
every rank (see that script for how each is measured).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ecdit.data.synthetic import write_synthetic_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(folder, 8, 12, image_size=16, seed=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           str(ROOT / "tests/distributed/check_data.py"), str(folder / "{000000..000007}.tar")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [line] = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def test_layout_is_tp2_x_dp2(result):
    assert (result["tp_size"], result["dp_size"]) == (2, 2)


def test_tensor_parallel_peers_see_identical_batches(result):
    assert result["tp_peers_identical"] and result["tp_peers_identical_epochs"]
    assert result["dp_ranks_differ"]


def test_each_sample_reaches_one_dp_rank_per_epoch(result):
    assert result["each_sample_once_per_epoch"]
    assert result["epochs_differ_in_order"]


@pytest.mark.parametrize("mode", ["resampled", "epochs"])
def test_resume_gives_the_next_batches_on_every_rank(result, mode):
    assert result[f"resume_exact_{mode}"]
