#!/usr/bin/env bash
# Generates the Python stubs for rws.v1 into OUT (default: examples/python/generated),
# which classify.py imports. Needs grpcio-tools: PYTHON names an interpreter that
# has it (default python3; e.g. PYTHON=.venv/bin/python after scripts/test.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/examples/python/generated}"
mkdir -p "$out"
"${PYTHON:-python3}" -m grpc_tools.protoc -I "$root/proto" \
    --python_out="$out" --grpc_python_out="$out" \
    "$root"/proto/rws/v1/*.proto
echo "stubs written to $out"
