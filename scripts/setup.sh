#!/usr/bin/env bash
# Creates or reuses .venv and installs the project into it from the lock (requirements.lock: every
# package pinned to the version the reference run used). Idempotent and quick when up to date.
# torch: the locked CPU wheel (torch==2.13.0) is installed first when no torch is importable; an
# unpinned torch would pull gigabytes of CUDA wheels. A torch that is already there (e.g. a CUDA
# build on a GPU machine) is kept, and the lock's torch line is left out for it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
LOCK=requirements.lock
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.qlora-pipeline-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$LOCK" ] \
  && "$VENV/bin/python" -c "import qlora_pipeline, torch" 2>/dev/null; then
  exit 0
fi
constraints="$VENV/constraints.txt"
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  grep -v '^torch==' "$LOCK" > "$constraints"   # keep the torch that is there
else
  torch_pin=$(grep '^torch==' "$LOCK")
  echo "[setup] installing $torch_pin (CPU build)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$torch_pin"
  cp "$LOCK" "$constraints"
fi
echo "[setup] installing qlora-pipeline and its locked stack into $VENV (first time: a few minutes)"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$constraints" -e ".[dev]"
touch "$stamp"
