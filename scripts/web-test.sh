#!/usr/bin/env bash
# The operator UI (web/) in a real browser: installs Debian's chromium when missing,
# installs web/'s locked npm packages, regenerates the stubs (web/src/gen) and rebuilds the
# bundle (web/dist), and fails if either differs from what is committed (the manager
# embeds web/dist, so `cargo build` needs no Node, and this check keeps it fresh). Then
# builds the binaries, starts a PostgreSQL cluster of its own (as the `postgres` user:
# PostgreSQL refuses to run as root) and runs web/tests/ with node's test runner:
# playwright-core drives /usr/bin/chromium against `agentrun dev` stacks the tests start
# on that cluster (so a test can restart the manager and keep the data). Screenshots go
# to docs/screenshots/.
#
#   bash scripts/web-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

say() { echo "web-test: $*"; }
die() { echo "web-test: FAILED: $*" >&2; exit 1; }

# How long PostgreSQL may take to start and to stop, and the whole browser suite.
PG_TIMEOUT_S=60
TESTS_TIMEOUT_S=900

chromium=/usr/bin/chromium
if [ ! -x "$chromium" ]; then
  say "installing chromium (Debian's package)"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || die "apt-get install chromium failed"
fi
say "$("$chromium" --version 2>/dev/null | head -n 1)"

say "installing web/'s locked packages (npm ci)"
(cd web && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci in web/ failed"
say "regenerating web/src/gen (buf + protoc-gen-es) and rebuilding web/dist (esbuild)"
(cd web && npm run --silent gen && npm run --silent typecheck && npm run --silent build) \
  || die "the web build failed"
# Untracked files count too (a new stub or asset that was never committed).
if ! git diff --exit-code --stat -- web/dist web/src/gen \
  || [ -n "$(git ls-files --others --exclude-standard -- web/dist web/src/gen)" ]; then
  git status --short -- web/dist web/src/gen >&2
  die "web/dist or web/src/gen is not what web/ and proto/ build: run \`npm run gen && npm run build\` in web/ and commit the result"
fi
say "ok: web/dist and web/src/gen are fresh ($(wc -c <web/dist/assets/app.js) bytes of app.js)"

say "building the binaries (cargo build --bins)"
cargo build --bins --quiet || die "cargo build --bins failed"

pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[ -x "$pg_bin/initdb" ] || die "no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)"
work="$(mktemp -d -t agentrun-web-test.XXXXXX)"
chmod 755 "$work"
mkdir -p "$work/pg" "$work/logs"
pg_port="$(node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')"
as_pg=()
if [ "$(id -u)" = 0 ]; then
  chown postgres "$work/pg"
  as_pg=(runuser -u postgres --)
fi

pg_started=0
cleanup() {
  local status=$?
  # Whatever dev stacks a crashed test left behind (only the pids it recorded).
  for pidfile in "$work"/logs/*.pid; do
    [ -e "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      say "stopping leftover agentrun dev (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  if [ "$status" -ne 0 ]; then
    for log in "$work"/logs/*.log; do
      [ -e "$log" ] || continue
      echo "---- $(basename "$log") (last 60 lines) ----" >&2
      tail -n 60 "$log" >&2 || true
    done
    if [ -e "$work/postgres.log" ]; then
      echo "---- postgres.log (last 20 lines) ----" >&2
      tail -n 20 "$work/postgres.log" >&2 || true
    fi
  fi
  if [ "$pg_started" = 1 ]; then
    "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/pg" -m fast -t "$PG_TIMEOUT_S" -w stop >/dev/null 2>&1 \
      || echo "web-test: PostgreSQL did not stop cleanly" >&2
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting PostgreSQL ($pg_bin) on 127.0.0.1:$pg_port in $work/pg"
"${as_pg[@]}" "$pg_bin/initdb" -D "$work/pg" -U postgres --auth=trust -E UTF8 >"$work/initdb.log" 2>&1 \
  || { cat "$work/initdb.log" >&2; die "initdb failed"; }
touch "$work/postgres.log" && chmod 666 "$work/postgres.log"
"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/pg" -l "$work/postgres.log" -t "$PG_TIMEOUT_S" -w \
  -o "-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null \
  || die "PostgreSQL did not start"
pg_started=1
for db in agentrun agentrun_auth; do
  "${as_pg[@]}" "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres "$db" || die "createdb $db failed"
done

say "running web/tests (node --test) with chromium against agentrun dev"
set +e
AGENTRUN_BIN="${AGENTRUN_BIN:-$root/target/debug/agentrun}" \
  WEB_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/agentrun" \
  WEB_TEST_DATABASE_URL_AUTH="postgres://postgres@127.0.0.1:$pg_port/agentrun_auth" \
  WEB_TEST_LOG_DIR="$work/logs" \
  WEB_TEST_SCREENSHOTS="$root/docs/screenshots" \
  CHROMIUM="$chromium" \
  timeout --signal=TERM --kill-after=30 "$TESTS_TIMEOUT_S" \
  node --test --test-concurrency=1 --test-reporter=spec web/tests/
status=$?
set -e
[ "$status" -eq 0 ] || die "the browser tests failed (node --test exited $status)"
say "ok: every browser test passed; screenshots in docs/screenshots/"
