"""megatron_ecdit: pretraining EC-DiT (expert-choice MoE diffusion transformers) on megatron-core.

Two process-wide settings are made here, once, for every entry point and tool:
  - nothing is downloaded at run time: Hugging Face libraries run offline and load models from
    local folders or packages only (a user may still set these variables to 0);
  - megatron-core's "Transformer Engine and Apex are not installed" warning, which it repeats
    from several modules in every rank, is silenced; the training job says once which fused
    paths are in use (`training/trainer.py`).
"""

import os
import warnings

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
