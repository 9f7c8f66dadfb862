#!/usr/bin/env bash
# Creates or reuses .venv and installs the project into it. Idempotent and quick when up to date.
# torch: the CPU wheel (torch==2.13.0) is installed first when no torch is importable; an unpinned
# torch would pull gigabytes of CUDA wheels. A torch that is already there (e.g. a CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.qlora-pipeline-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && "$VENV/bin/python" -c "import qlora_pipeline, torch" 2>/dev/null; then
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "torch==2.13.0"
fi
echo "[setup] installing qlora-pipeline and its stack into $VENV (first time: a few minutes)"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -e ".[dev]"
touch "$stamp"
