#!/usr/bin/env bash
# Regenerates the Python stubs for agentrun.v1 from ../../proto into the package:
# agentrun/v1/{types,run_service,session_service,admin_service,runner_service}_pb2.py,
# their *_pb2_grpc.py and *.pyi. The proto package is agentrun.v1 and the stubs import
# each other as `agentrun.v1.<name>_pb2`, so they live at agentrun/v1/ inside the
# `agentrun` package and need no rewriting. The stubs are committed;
# scripts/python-client-test.sh regenerates them into a temp dir and fails if they differ.
#
#   bash clients/python/generate.sh            # rewrite clients/python/agentrun/v1
#   OUT=/tmp/x bash clients/python/generate.sh # write /tmp/x/agentrun/v1 instead
#
# Needs grpcio-tools and protobuf at the versions pinned in requirements.txt (the
# generated code records them); PYTHON picks the interpreter (default python3).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto="$(cd "$here/../../proto" && pwd)"
python="${PYTHON:-python3}"
# protoc runs from proto/: a relative interpreter path must not depend on that.
if [[ "$python" == */* ]]; then
  python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
fi
out="${OUT:-$here}"
dest="$out/agentrun/v1"

rm -rf "$dest"
mkdir -p "$dest"
echo "generating Python stubs from $proto into $dest"
(
  cd "$proto"
  "$python" -m grpc_tools.protoc -I . \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    agentrun/v1/*.proto
)
cat >"$dest/__init__.py" <<'PY'
"""Generated protobuf and gRPC stubs for agentrun.v1 (by clients/python/generate.sh).

Do not edit: regenerate instead. The SDK in `agentrun` wraps them; import them directly
only for what the SDK does not cover (e.g. `agentrun.v1.session_service_pb2`).
"""
PY
ls "$dest"
