#!/usr/bin/env bash
# Fuzzes runner event validation and secret redaction (fuzz/fuzz_targets/event_payload.rs)
# for N seconds (default 60), starting from the seed corpus in fuzz/corpus/event_payload/.
#
#   bash scripts/fuzz.sh [seconds]
#
# Needs the nightly toolchain (cargo-fuzz builds with sanitizer flags); installs cargo-fuzz
# from crates.io if it is missing. A crash leaves its input in fuzz/artifacts/event_payload/
# and exits non-zero; replay it with
#   cargo +nightly fuzz run event_payload fuzz/artifacts/event_payload/<file>
# Environment: FUZZ_SANITIZER (default none: the target is safe Rust; `address` also works),
# FUZZ_JOBS (parallel fuzzing processes, default 1).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
jobs="${FUZZ_JOBS:-1}"

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

started=$(date +%s)
# Release build with debug assertions, so integer overflow panics as in the tests.
cargo +nightly fuzz build --sanitizer "$sanitizer" --debug-assertions event_payload
echo "fuzz: built in $(( $(date +%s) - started )) s; fuzzing for ${seconds} s"

libfuzzer_args=(
  -max_total_time="$seconds"
  -dict=fuzz/event_payload.dict
  -max_len=4096
  -timeout=10
  -print_final_stats=1
)
if [ "$jobs" -gt 1 ]; then
  # Each job logs to fuzz-<n>.log in the working directory.
  libfuzzer_args+=(-jobs="$jobs" -workers="$jobs")
fi
cargo +nightly fuzz run --sanitizer "$sanitizer" --debug-assertions event_payload \
  fuzz/corpus/event_payload -- "${libfuzzer_args[@]}"
echo "fuzz: done in $(( $(date +%s) - started )) s, no crash"
