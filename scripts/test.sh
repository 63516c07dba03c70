#!/usr/bin/env bash
# Run the test suite (creates or reuses .venv). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Two workers (pytest-xdist), each test file on one of them (its module fixtures run once):
# much of a distributed test is start-up and waiting. The Slurm files take their turns
# (tests/slurm_jobs.py). ECDIT_TEST_WORKERS=0 runs everything in this process.
python -m pytest -q -n "${ECDIT_TEST_WORKERS:-2}" --dist loadfile "$@"
