#!/usr/bin/env bash
# Run job_templates/ in a real local NVFlare POC system (see poc/run_poc.py); output in runs/poc-<time>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" poc/run_poc.py --out "runs/poc-$(date +%Y%m%d-%H%M%S)" "$@"
