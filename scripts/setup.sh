#!/usr/bin/env bash
# Creates or reuses .venv and installs the project into it from the lock (requirements.lock: every
# package pinned to the version the reference run used). Idempotent and quick when up to date.
# torch: the locked CPU wheel (torch==2.13.0) is installed first, by pip, when no torch is
# importable; an unpinned torch would pull gigabytes of CUDA wheels. A torch that is already
# there (e.g. a CUDA build on a GPU machine) is kept. The rest of the lock: by uv (pinned).
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
# Both packages found, not imported: importing torch took 1.7 s of every `make run` and `make test`.
installed='import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ("qlora_pipeline", "torch"))))'
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$LOCK" ] \
  && "$VENV/bin/python" -c "$installed" 2>/dev/null; then
  exit 0
fi
UV_PIN=uv==0.13.9  # installs the locked stack in seconds where pip takes minutes (same packages)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  torch_pin=$(grep '^torch==' "$LOCK")
  echo "[setup] installing $torch_pin (CPU build)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$torch_pin"
fi
# The torch that is there is kept (this CPU wheel, or a CUDA build on a GPU machine): it is left
# out of the constraints, so uv, which does not look at the local wheel, never replaces it.
constraints="$VENV/constraints.txt"
grep -v '^torch==' "$LOCK" > "$constraints"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q "$UV_PIN"
echo "[setup] installing qlora-pipeline and its locked stack into $VENV"
# --compile-bytecode: pip writes .pyc files at install time and uv does not; where
# PYTHONDONTWRITEBYTECODE is set (CI here) nothing writes them later, and every process (each
# stage, each test's CLI) compiled prefect, dvc, transformers, ... from source again: imports
# took about twice as long.
"$VENV/bin/uv" pip install -q --compile-bytecode --python "$VENV/bin/python" -c "$constraints" -e ".[dev]"
touch "$stamp"
