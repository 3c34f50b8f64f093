#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, lint, run every test that can run here
# (GPU tests skip themselves without CUDA). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_system.sh
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q --timeout 1500 --durations=25 "$@"
