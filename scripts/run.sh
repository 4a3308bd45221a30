#!/usr/bin/env bash
# Runs the bot: builds Helpline (release), fetches the default model if it is missing, and serves the
# OpenAI-compatible API, the customer chat page (/) and the agent console (/agent) on
# http://127.0.0.1:8080 (it prints the URL). Conversations are stored in data/ (SQLite).
# Extra arguments go to `helpline serve`, e.g. `scripts/run.sh --port 9000`.
#
# Agent routes need an agent key, admin routes (index and policy reload, metrics, raw completions,
# tokenize) an admin key. Unless HELPLINE_AGENT_API_KEY / HELPLINE_AGENT_API_KEYS_FILE (and
# HELPLINE_ADMIN_API_KEY / HELPLINE_ADMIN_API_KEYS_FILE) are set, a random key is made once and kept
# in data/agent.key (data/admin.key), readable by this user only; paste the agent key into the
# agent console.
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
if [ -z "${HELPLINE_ADMIN_API_KEY:-}" ] && [ -z "${HELPLINE_ADMIN_API_KEYS_FILE:-}" ]; then
  mkdir -p data
  if [ ! -s data/admin.key ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > data/admin.key)
  fi
  HELPLINE_ADMIN_API_KEY=$(cat data/admin.key)
  export HELPLINE_ADMIN_API_KEY
  echo "admin routes (reload, /metrics): admin key in data/admin.key" >&2
fi
exec target/release/helpline serve "$@"
