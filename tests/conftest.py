"""Shared fixtures. Models need megatron-core's (size-one) process groups in a single process."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def ctx():
    from megatron_ecdit.config import Config
    from megatron_ecdit.parallel.layout import ParallelLayout
    from megatron_ecdit.parallel.setup import initialize_parallel
    return initialize_parallel(ParallelLayout.build(Config(), world_size=1))
