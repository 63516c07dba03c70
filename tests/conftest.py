"""Shared fixtures. Models need megatron-core's (size-one) process groups in a single process."""

import os
import signal
import subprocess

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


def save_tiny_vae(folder, shift_factor):
    """A tiny diffusers AutoencoderKL (8 latent channels, downsampling 2) saved to `folder`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=8, norm_num_groups=4,
                        sample_size=16, scaling_factor=0.5, shift_factor=shift_factor)
    vae.save_pretrained(folder)
    return folder


def run_in_own_session(cmd: list[str], env: dict, timeout: int = 300) -> int:
    """Run `cmd` in its own session and return its exit code; afterwards kill what is left of
    the session (a SIGKILLed trainer leaves dist_checkpointing's helper process behind)."""
    with open(os.devnull, "w") as sink:
        child = subprocess.Popen(cmd, env=env, stdout=sink, stderr=sink,
                                 start_new_session=True)
        try:
            return child.wait(timeout=timeout)
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
