"""Run under torchrun with 4 processes (TP2 x DP2): the shard stream of each data-parallel rank.

    torchrun --nproc-per-node 4 tests/distributed/check_data.py 'DIR/{000000..000007}.tar'

The shards must hold 8 x 12 samples. With 2 DataLoader workers per rank, checks that
tensor-parallel peers get identical batches (keys and pixels, gathered over the TP group) while
data-parallel ranks differ; that with resampled=False every sample reaches exactly one DP rank
per epoch, in a new order each epoch; and that a resume after 5 batches gives exactly the next
batches on every rank. Rank 0 prints one line "RESULT {json}"; any exception exits non-zero.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from megatron_ecdit.config import DataConfig, load_config  # noqa: E402
from megatron_ecdit.data.shards import BatchStream  # noqa: E402
from megatron_ecdit.parallel.layout import ParallelLayout  # noqa: E402
from megatron_ecdit.parallel.setup import initialize_parallel, world_size  # noqa: E402

SAMPLES, BATCH, WORKERS = 96, 4, 2


def stream(urls: str, resampled: bool) -> BatchStream:
    cfg = DataConfig(urls=urls, image_size=16, shuffle_buffer=8, num_workers=WORKERS,
                     resampled=resampled, seed=5)
    return BatchStream(cfg, BATCH, dp_rank=ps.get_data_parallel_rank(),
                       dp_size=ps.get_data_parallel_world_size())


def fingerprint(batches: list[dict]) -> torch.Tensor:
    """Per sample: its key as a number and the sum of its pixels, (N, 2) float64."""
    keys = torch.tensor([float(k) for b in batches for k in b["key"]], dtype=torch.float64)
    pixels = torch.cat([b["image"].double().sum(dim=(1, 2, 3)) for b in batches])
    return torch.stack([keys, pixels], dim=1)


def gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def take(batches, n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


def all_ranks(ok: bool) -> bool:
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def main(urls: str) -> None:
    cfg = load_config(None, ["parallel.tp=2"])
    initialize_parallel(ParallelLayout.build(cfg, world_size()))
    tp_group, dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
    result = {"dp_size": ps.get_data_parallel_world_size(),
              "tp_size": ps.get_tensor_model_parallel_world_size()}

    # Resampled (the training default): TP peers identical, DP ranks different.
    mine = fingerprint(take(stream(urls, resampled=True), 6))
    peers = gather(mine, tp_group)
    result["tp_peers_identical"] = all_ranks(all(torch.equal(p, mine) for p in peers))
    keys_by_dp = gather(mine[:, 0].contiguous(), dp_group)
    result["dp_ranks_differ"] = all_ranks(not torch.equal(keys_by_dp[0], keys_by_dp[1]))

    # Epochs: each sample once per epoch across DP ranks. Every worker has 2 shards = 6 batches
    # per epoch, so a rank's first 12 batches are its epoch 0 and the next 12 its epoch 1.
    per_rank = SAMPLES // result["dp_size"]
    keys = fingerprint(take(stream(urls, resampled=False), 24))[:, 0].contiguous()
    epochs = [torch.cat([k[e * per_rank:(e + 1) * per_rank] for k in gather(keys, dp_group)])
              for e in range(2)]
    expected = sorted(float(f"{s:05d}{i:04d}") for s in range(8) for i in range(12))
    result["each_sample_once_per_epoch"] = all_ranks(
        all(sorted(e.tolist()) == expected for e in epochs))
    result["epochs_differ_in_order"] = all_ranks(not torch.equal(epochs[0], epochs[1]))
    result["tp_peers_identical_epochs"] = all_ranks(
        all(torch.equal(p, keys) for p in gather(keys, tp_group)))

    # Resume after 5 batches (worker 1 comes next) gives exactly the next 6 on every rank.
    for name, resampled in (("resampled", True), ("epochs", False)):
        first = stream(urls, resampled)
        take(first, 5)
        state = json.loads(json.dumps(first.state_dict()))
        expected_batches = fingerprint(take(first, 6))
        resumed = stream(urls, resampled)
        resumed.load_state_dict(state)
        got = fingerprint(take(resumed, 6))
        result[f"resume_exact_{name}"] = all_ranks(
            state["next_worker"] == 1 and torch.equal(got, expected_batches))

    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
