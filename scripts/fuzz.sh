#!/usr/bin/env bash
# Runs the property tests (tests/it/properties.rs: the GGUF reader on mutated files, request
# validation on random JSON, the grammar compiler on random regexes and Lark grammars, the chat
# template on random message text) with many more cases than the test command does, and prints the
# time each took.
#
#   scripts/fuzz.sh [CASES]      (default 5000 per property)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cases=${1:-5000}
target/release/helpline models pull >/dev/null 2>&1 || cargo run --release --locked -- models pull
export HELPLINE_PROPTEST_CASES=$cases
start=$(date +%s)
cargo test --release --locked --test it -- --test-threads 1 --nocapture properties:: 2>&1 | tee target/fuzz.log
echo "$cases cases per property, $(( $(date +%s) - start )) s in all" >&2
