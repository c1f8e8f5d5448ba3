#!/usr/bin/env bash
# Generates the Python stubs for agentrun.v1 from ../../proto into ./gen (importable as
# `agentrun.v1.run_service_pb2`, `agentrun.v1.run_service_pb2_grpc`, ...).
# Needs the packages in requirements.txt; PYTHON picks the interpreter (default python3).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto="$(cd "$here/../../proto" && pwd)"
python="${PYTHON:-python3}"
out="$here/gen"

rm -rf "$out"
mkdir -p "$out"
echo "generating Python stubs from $proto into $out"
(
  cd "$proto"
  "$python" -m grpc_tools.protoc -I . \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    agentrun/v1/*.proto
)
ls "$out/agentrun/v1"
