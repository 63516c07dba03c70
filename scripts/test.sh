#!/usr/bin/env bash
# Run the test suite (creates or reuses .venv). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Two workers (pytest-xdist), a file per worker at a time (tests/conftest.py): much of a
# distributed test is start-up and waiting. ECDIT_TEST_WORKERS=0 runs in this process.
python -m pytest -q -n "${ECDIT_TEST_WORKERS:-2}" --dist loadgroup "$@"
