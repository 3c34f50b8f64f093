#!/usr/bin/env bash
# RLinf-style entry point, kept as a thin wrapper over the project's CLI:
#   bash examples/embodiment/run_embodiment.sh CONFIG [key.sub=value ...]
# CONFIG is a path, or a name under examples/embodiment/config/ (with or without .yaml), e.g.
#   bash examples/embodiment/run_embodiment.sh maniskill_ppo_openvla actor.model.model_path=/data/openvla-7b
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [key.sub=value ...]" >&2
    exit 2
fi
config="$1"
shift
if [[ ! -f "$config" ]]; then
    named="$repo/examples/embodiment/config/${config%.yaml}.yaml"
    if [[ ! -f "$named" ]]; then
        echo "$0: no config file '$config' (nor $named)" >&2
        exit 2
    fi
    config="$named"
fi

vla_rl="$repo/.venv/bin/vla-rl"
if [[ ! -x "$vla_rl" ]]; then
    echo "$0: $vla_rl not found; set up the environment first (bash scripts/setup_env.sh)" >&2
    exit 2
fi
exec "$vla_rl" train --config "$config" "$@"
