#!/usr/bin/env bash
# Generates the Python stubs of protos/vla_rl/v1/*.proto into vla_rl/rpc/gen/v1/ (or into the
# directory given as $1, which then gets the same layout: $1/__init__.py, $1/v1/*_pb2*.py[i]).
# Stubs import as `from vla_rl.rpc.gen.v1 import rollout_pb2, rollout_pb2_grpc`.
# Output is deterministic, so CI regenerates into a temporary directory and compares bytes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -ge 1 ]; then
  mkdir -p "$1"
  OUT="$(cd "$1" && pwd)"
else
  OUT="$ROOT/vla_rl/rpc/gen"
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

cd "$ROOT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# The proto import path stays vla_rl/v1/*.proto so that the descriptor pool (and reflection)
# names the files as the .proto sources do; only the Python module path moves (below).
"$PYTHON" -m grpc_tools.protoc -I protos \
  --python_out="$TMP" --pyi_out="$TMP" --grpc_python_out="$TMP" \
  protos/vla_rl/v1/*.proto

mkdir -p "$OUT/v1"
rm -f "$OUT"/v1/*_pb2.py "$OUT"/v1/*_pb2.pyi "$OUT"/v1/*_pb2_grpc.py
# protoc writes `from vla_rl.v1 import common_pb2`, which would resolve against our own top-level
# package; point those imports (and the module names given to the message classes) at the
# package the stubs live in. Only these two anchored line shapes are touched, never the
# serialized descriptors or the '/vla_rl.v1.Service/Method' paths.
"$PYTHON" - "$TMP/vla_rl/v1" "$OUT/v1" <<'PY'
import pathlib
import re
import sys

src, dst = map(pathlib.Path, sys.argv[1:])
rules = [
    (re.compile(r"^from vla_rl\.v1 import ", re.M), "from vla_rl.rpc.gen.v1 import "),
    (
        re.compile(r"^(_builder\.BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'vla_rl\.v1\.", re.M),
        r"\1'vla_rl.rpc.gen.v1.",
    ),
]
for path in sorted(src.iterdir()):
    text = path.read_text(encoding="utf-8")
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    if re.search(r"^(from|import) vla_rl\.v1\b", text, re.M):
        sys.exit(f"gen_protos: unrewritten vla_rl.v1 import left in {path.name}")
    (dst / path.name).write_text(text, encoding="utf-8")
PY

printf '"""Generated gRPC/protobuf stubs (scripts/gen_protos.sh). Do not edit."""\n' \
  >"$OUT/__init__.py"
printf '"""Stubs of protos/vla_rl/v1 (scripts/gen_protos.sh). Do not edit."""\n' \
  >"$OUT/v1/__init__.py"
echo "gen_protos: wrote $(ls "$OUT"/v1/*_pb2*.py* | wc -l | tr -d ' ') files to $OUT/v1"
