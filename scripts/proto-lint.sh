#!/usr/bin/env bash
# Lints the proto contract with buf (buf.yaml at the repo root), installed from the npm
# registry into target/tools (not globally), and checks that it compiles.
#
#   bash scripts/proto-lint.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0
tools=target/tools
buf="$tools/node_modules/.bin/buf"
if [ ! -x "$buf" ] || [ "$("$buf" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  echo "proto-lint: installing @bufbuild/buf@$BUF_VERSION into $tools"
  mkdir -p "$tools"
  npm install --prefix "$tools" --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION"
fi
echo "proto-lint: buf $("$buf" --version) build + lint proto/"
"$buf" build -o /dev/null
"$buf" lint
echo "proto-lint: ok"
