#!/usr/bin/env bash
# Runs the bot: builds Helpline (release), fetches the default model if it is missing, and serves the
# OpenAI-compatible API, the customer chat page (/) and the agent console (/agent) on
# http://127.0.0.1:8080 (it prints the URL). Conversations are stored in data/ (SQLite).
# Extra arguments go to `helpline serve`, e.g. `scripts/run.sh --port 9000`.
#
# Agent routes need an agent key. Unless HELPLINE_AGENT_API_KEY or HELPLINE_AGENT_API_KEYS_FILE is
# set, a random key is made once and kept in data/agent.key (readable by this user only); paste it
# into the agent console.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --locked
if [ -z "${HELPLINE_AGENT_API_KEY:-}" ] && [ -z "${HELPLINE_AGENT_API_KEYS_FILE:-}" ]; then
  mkdir -p data
  if [ ! -s data/agent.key ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > data/agent.key)
  fi
  HELPLINE_AGENT_API_KEY=$(cat data/agent.key)
  export HELPLINE_AGENT_API_KEY
  echo "agent console: /agent (agent key in data/agent.key)" >&2
fi
exec target/release/helpline serve "$@"
