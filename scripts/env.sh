# Create or reuse the project-local .venv and install what the project needs. Sourced by
# demo.sh and test.sh. torch is installed first and pinned (2.13.0): on a CPU machine pip then
# takes the CPU wheel instead of resolving a CUDA build of several GB.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  PY="$(command -v python3.11 || command -v python3)"
  echo "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.megatron_ecdit-installed"
WANT="$(cat "$ROOT/setup.py" "$ROOT/scripts/env.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "installing megatron_ecdit and its dependencies into $VENV (about 2 minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# The offline Hugging Face switches and megatron-core's apex/TE notice are set once, in
# megatron_ecdit/__init__.py.
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"
