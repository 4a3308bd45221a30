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
# ensure_key SCOPE FILE NOTE: unless HELPLINE_<SCOPE>_API_KEY or ..._API_KEYS_FILE is set, use the
# key kept in FILE (made once, readable by this user only) and say where it is.
ensure_key() {
  local var="HELPLINE_$1_API_KEY" file_var="HELPLINE_$1_API_KEYS_FILE"
  if [ -z "${!var:-}" ] && [ -z "${!file_var:-}" ]; then
    mkdir -p data
    if [ ! -s "$2" ]; then
      (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > "$2")
    fi
    export "$var=$(cat "$2")"
    echo "$3" >&2
  fi
}
ensure_key AGENT data/agent.key "agent console: /agent (agent key in data/agent.key)"
ensure_key ADMIN data/admin.key "admin routes (reload, /metrics): admin key in data/admin.key"
exec target/release/helpline serve "$@"
