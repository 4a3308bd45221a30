#!/usr/bin/env bash
# Runs the bot: builds Helpline (release), fetches the default model if it is missing, and serves the
# OpenAI-compatible API on http://127.0.0.1:8080 (it prints the URL). Extra arguments go to
# `helpline serve`, e.g. `scripts/run.sh --port 9000`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --locked
exec target/release/helpline serve "$@"
