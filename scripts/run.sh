#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run `vla-rl` (default: `vla-rl experiment`, the warm-start story on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_system.sh
bash scripts/setup_env.sh
if [ $# -eq 0 ]; then set -- experiment; fi
exec .venv/bin/vla-rl "$@"
