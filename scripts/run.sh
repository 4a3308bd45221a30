#!/usr/bin/env bash
# Runs the bot: builds Helpline (release), fetches the default model if it is missing, and starts
# an interactive chat in this terminal. Extra arguments go to `helpline chat`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --locked
exec target/release/helpline chat "$@"
