#!/usr/bin/env bash
# Runs the whole test suite: builds in release (dependencies and kernels optimized), fetches and
# verifies the default model and the Gemma 3 test model, then runs every unit and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --locked
target/release/helpline models pull
python3 -m pip install --quiet --disable-pip-version-check 'openai>=1.40'
cargo test --release --locked "$@"
