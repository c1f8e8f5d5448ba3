#!/usr/bin/env bash
# The TypeScript SDK (clients/typescript, @agentrun/client) against a live stack:
#   1. `npm ci` in clients/typescript (the committed package-lock, exact versions);
#   2. the committed stubs (src/gen) must equal what buf + protoc-gen-es produce from
#      proto/ now (freshness check), then `npm run build` (tsc: dist/, ESM + .d.ts);
#   3. the package installed as a user would: `npm pack`, then `npm install` of the
#      tarball into an empty project outside the tree (from npm's cache), checked to load;
#   4. a PostgreSQL cluster of our own (a temp dir, a free port) and `agentrun dev` on it
#      with the web UI (gRPC-Web) on a second port, supervised: whenever dev exits before
#      the end it is started again on the same DATABASE_URL and ports, which is how the
#      tests lose and regain the manager;
#      A second `agentrun dev --auth` (throwaway cluster, no runners) serves the
#      API-key tests;
#   5. examples/quickstart.mjs (the README's example, run from the installed copy) and
#      the `node --test` suite (clients/typescript/tests);
#   6. everything we started is stopped by pid, the cluster removed.
#
#   bash scripts/typescript-client-test.sh [extra node --test args]
#
# Builds the binaries first (`cargo build --bins`, a no-op when current). As root,
# PostgreSQL runs as the `postgres` user (it refuses to run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

say() { echo "typescript-client-test: $*"; }
die() { echo "typescript-client-test: FAILED: $*" >&2; exit 1; }

# How long `agentrun dev` may take to serve (migrations), and to stop.
START_TIMEOUT_S=90
STOP_TIMEOUT_S=45
# Scripted runs stream one token per 20 ms, so a 120-token reply lasts a few seconds and
# the tests can cut a watch mid-run. Runners give a running run 0.5 s to finish when told
# to stop, then release it back to the queue (the manager-restart test relies on it).
export AGENTRUN_SCRIPTED_TOKEN_DELAY_MS=20
export AGENTRUN_DRAIN_GRACE_MS=500

pkg="$root/clients/typescript"
command -v node >/dev/null && command -v npm >/dev/null || die "node and npm are needed"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
  || die "Node 20 or newer is needed (found $(node --version))"

# ---- 1. dependencies, exactly as locked ------------------------------------------------
say "npm ci (clients/typescript)"
(cd "$pkg" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci failed"

# ---- 2. the committed stubs are what the protos generate; the build ----------------------
say "checking the committed stubs are fresh (npm run gen, then git diff)"
(cd "$pkg" && npm run --silent gen) || die "npm run gen failed"
if ! git diff --exit-code --stat -- "$pkg/src/gen" || [ -n "$(git status --porcelain -- "$pkg/src/gen")" ]; then
  git status --porcelain -- "$pkg/src/gen" >&2
  die "clients/typescript/src/gen is stale: the protos changed. Run \`npm run gen\` in \
clients/typescript and commit the result."
fi
say "ok: the stubs match proto/"

say "npm run build (tsc: dist/)"
rm -rf "$pkg/dist"
(cd "$pkg" && npm run --silent build) || die "npm run build failed"

# The README's example is examples/quickstart.mjs, word for word.
node - "$pkg/README.md" "$pkg/examples/quickstart.mjs" <<'JS' || die "the first js block of clients/typescript/README.md differs from examples/quickstart.mjs"
const fs = require("node:fs");
const [readme, example] = process.argv.slice(2).map((p) => fs.readFileSync(p, "utf8"));
const block = readme.split("```js\n")[1]?.split("```")[0];
process.exit(block === example ? 0 : 1);
JS

# ---- 3. install the package as a user would ---------------------------------------------
work="$(mktemp -d /tmp/agentrun-ts-test.XXXXXX)"
chmod 755 "$work"
say "npm pack, then npm install of the tarball into $work/app"
tarball="$(cd "$pkg" && npm pack --silent --pack-destination "$work" | tail -n 1)"
mkdir -p "$work/app"
(cd "$work/app" && echo '{"name":"app","private":true,"type":"module"}' >package.json \
  && npm install --prefer-offline --no-audit --no-fund --loglevel=error "$work/$tarball") \
  || die "npm install of the packed @agentrun/client failed"
cp "$pkg/examples/quickstart.mjs" "$work/app/"
(cd "$work/app" && node -e 'import("@agentrun/client").then((m) => { if (typeof m.Client !== "function") process.exit(1); })') \
  || die "the installed @agentrun/client does not load"
say "ok: the packed package installs and loads"

# ---- 4. PostgreSQL and a supervised `agentrun dev` ---------------------------------------
say "building the binaries (cargo build --bins)"
cargo build --bins --quiet || die "cargo build --bins failed"
agentrun="$root/target/debug/agentrun"

free_port() { node -e 'const s = require("node:net").createServer(); s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });'; }

pg_bin=""
for dir in $(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)") /usr/lib/postgresql/*/bin; do
  if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then pg_bin="$dir"; break; fi
done
[ -n "$pg_bin" ] || die "PostgreSQL server binaries (initdb, pg_ctl) not found"
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

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
      echo "typescript-client-test: pid $pid did not stop within ${STOP_TIMEOUT_S}s; killing it" >&2
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
        echo "typescript-client-test: agentrun dev did not stop within ${STOP_TIMEOUT_S}s; killing it" >&2
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
ui_port="$(free_port)"
addr="127.0.0.1:$port"
ui_addr="127.0.0.1:$ui_port"
say "starting agentrun dev on $addr (UI/gRPC-Web on $ui_addr) with 1 runner, database $DATABASE_URL (log: $log)"
(
  # The supervisor: restarts dev whenever it exits, until the stop file exists.
  while [ ! -e "$stopfile" ]; do
    RUST_LOG="${RUST_LOG:-info}" "$agentrun" dev --listen "$addr" --ui-listen "$ui_addr" --runners 1 >>"$log" 2>&1 &
    echo "$!" >"$pidfile"
    wait "$!" || true
    echo "typescript-client-test: agentrun dev exited" >>"$log"
  done
) &
supervisor_pid=$!

say "waiting up to ${START_TIMEOUT_S}s for $addr and $ui_addr to accept connections"
node - "$port" "$ui_port" "$supervisor_pid" "$START_TIMEOUT_S" <<'JS' || die "agentrun dev did not serve on $addr and $ui_addr"
const net = require("node:net");
const [port, uiPort, pid, timeout] = process.argv.slice(2).map(Number);
const deadline = Date.now() + timeout * 1000;
const accepts = (p) => new Promise((resolve) => {
  const s = net.connect(p, "127.0.0.1", () => { s.destroy(); resolve(true); });
  s.on("error", () => resolve(false));
});
(async () => {
  for (;;) {
    try { process.kill(pid, 0); } catch { console.error("the dev supervisor exited before serving"); process.exit(1); }
    if ((await accepts(port)) && (await accepts(uiPort))) process.exit(0);
    if (Date.now() > deadline) { console.error(`no listener on ${port}/${uiPort} after ${timeout}s`); process.exit(1); }
    await new Promise((r) => setTimeout(r, 200));
  }
})();
JS

# A second dev with API keys required (its own throwaway cluster, no runners) for the
# authentication tests; its banner prints a client key and an admin key.
auth_port="$(free_port)"
say "starting agentrun dev --auth on 127.0.0.1:$auth_port (no runners; log: $auth_log)"
env -u DATABASE_URL RUST_LOG="${RUST_LOG:-info}" \
  "$agentrun" dev --listen "127.0.0.1:$auth_port" --no-ui --runners 0 --auth >"$auth_log" 2>&1 &
auth_pid=$!
node - "$auth_log" "$auth_pid" "$START_TIMEOUT_S" <<'JS' || die "agentrun dev --auth did not print its keys"
const fs = require("node:fs");
const [log, pid, timeout] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
const deadline = Date.now() + timeout * 1000;
const poll = () => {
  const text = fs.readFileSync(log, "utf8");
  if (text.includes("  api key   ") && text.includes("  admin key ") && text.includes("stop: Ctrl-C")) process.exit(0);
  try { process.kill(pid, 0); } catch { console.error("agentrun dev --auth exited"); process.exit(1); }
  if (Date.now() > deadline) { console.error(`no keys in the banner after ${timeout}s`); process.exit(1); }
  setTimeout(poll, 200);
};
poll();
JS
auth_api_key="$(sed -n 's/^  api key   //p' "$auth_log" | head -n 1)"
auth_admin_key="$(sed -n 's/^  admin key //p' "$auth_log" | head -n 1)"
[ -n "$auth_api_key" ] && [ -n "$auth_admin_key" ] || die "cannot read the keys from the dev --auth banner"

# ---- 5. the example, the tests ------------------------------------------------------------
say "running examples/quickstart.mjs (the README's example) from the installed package"
(cd "$work/app" && AGENTRUN_MANAGER_URL="http://$addr" node quickstart.mjs) || die "quickstart.mjs failed"
say "ok: quickstart.mjs completed the run and answered its approval"

say "running the node --test suite (clients/typescript/tests)"
(cd "$pkg" && AGENTRUN_MANAGER_URL="http://$addr" AGENTRUN_UI_URL="http://$ui_addr" \
  AGENTRUN_TEST_DEV_PIDFILE="$pidfile" AGENTRUN_TEST_AUTH_URL="http://127.0.0.1:$auth_port" \
  AGENTRUN_TEST_API_KEY="$auth_api_key" AGENTRUN_TEST_ADMIN_KEY="$auth_admin_key" node --test --test-concurrency=1 "$@" tests/) \
  || die "node --test failed"
say "ok: the node --test suite passed"
