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

# Cheap checks through package metadata (importing torch and nvflare takes many seconds on a small machine).
has() { "$PY" - "$@" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    [version(name) for name in sys.argv[1:]]
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

if has torch torchvision; then
    echo "[setup] torch $("$PY" -c 'from importlib.metadata import version; print(version("torch"))') already installed"
else
    echo "[setup] installing $TORCH_PIN $TORCHVISION_PIN (first, so nothing else picks another torch)"
    "$PY" -m pip install --quiet "$TORCH_PIN" "$TORCHVISION_PIN"
fi

# The editable install must point at THIS checkout, not at another copy of the repository.
# (checked from / so that the current directory cannot shadow the installed package)
REPO="$(pwd -P)"
here_installed() { (cd / && "$REPO/$PY" - "$REPO" <<'PYEOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("nvflare_unlearn")
origin = spec.origin if spec is not None else None
sys.exit(0 if origin and pathlib.Path(origin).resolve().parents[1] == pathlib.Path(sys.argv[1]) else 1)
PYEOF
) }

if has nvflare-unlearn nvflare torch-pruning scikit-learn matplotlib tensorboard pytest pytest-timeout scipy ruff onnx onnxscript && here_installed; then
    echo "[setup] nvflare-unlearn already installed"
else
    echo "[setup] installing nvflare-unlearn (editable) with the dev extra"
    "$PY" -m pip install --quiet -e '.[dev]'
fi
echo "[setup] ready: $VENV/bin/python, $VENV/bin/nvflare-unlearn"
