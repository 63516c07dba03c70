#!/usr/bin/env bash
# Train the embedded default (tiny EC-DiT on synthetic shapes) and write outputs/demo/.
# Creates or reuses .venv. Extra arguments are config overrides, e.g. train.steps=100.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
python pretrain_ecdit.py --config examples/configs/demo.yaml "$@"
