#!/usr/bin/env bash
# One install path for newcomers, the README and CI: creates .venv (if missing) and installs the package.
# Idempotent: a second run only checks what is already there. Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_PIN="torch==2.14.1"          # the versions this machine serves locally; others pull gigabytes
TORCHVISION_PIN="torchvision==0.29.1"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || { echo "[setup] Python >= 3.10 is required, $VENV has $("$PY" --version 2>&1)" >&2; exit 1; }

if "$PY" -c 'import torch, torchvision' >/dev/null 2>&1; then
    echo "[setup] torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
else
    echo "[setup] installing $TORCH_PIN $TORCHVISION_PIN (first, so nothing else picks another torch)"
    "$PY" -m pip install --quiet "$TORCH_PIN" "$TORCHVISION_PIN"
fi

if "$PY" -c 'import nvflare_unlearn, nvflare, torch_pruning, pytest, pytest_timeout' >/dev/null 2>&1 \
    && "$PY" -m pip show nvflare-unlearn >/dev/null 2>&1; then
    echo "[setup] nvflare-unlearn already installed"
else
    echo "[setup] installing nvflare-unlearn (editable) with the dev extra"
    "$PY" -m pip install --quiet -e '.[dev]'
fi
echo "[setup] ready: $VENV/bin/python, $VENV/bin/nvflare-unlearn"
