#!/usr/bin/env bash
# The actions demo: starts the demo Tallyworks account backend (an example binary with its own
# SQLite, on 127.0.0.1:8091, clearly a demo) beside the bot, with the shipped actions file
# (docs-corpus/actions.toml), and serves the chat page with a demo sign-in: open
# http://127.0.0.1:8080/demo/sign-in/acct-1001 to chat as the demo customer Ann Lee (a signed
# customer token, good for an hour) and reset her password end to end. Extra arguments go to
# `helpline serve` (through scripts/run.sh).
#
# The backend's credential and the customer-token secret are random per run, made here and passed
# through the environment only (kept in data/demo/, readable by this user only).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --locked --example tallyworks-backend
mkdir -p data/demo
secret() { [ -s "$1" ] || (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(36))' > "$1"); cat "$1"; }
export TALLYWORKS_BACKEND_TOKEN="$(secret data/demo/backend.token)"
export TALLYWORKS_BACKEND_URL="http://127.0.0.1:${TALLYWORKS_BACKEND_PORT:-8091}"
target/release/examples/tallyworks-backend --port "${TALLYWORKS_BACKEND_PORT:-8091}" --db data/demo/tallyworks-demo.db &
backend=$!
trap 'kill "$backend" 2>/dev/null || true' EXIT
echo "demo backend (pid $backend): $TALLYWORKS_BACKEND_URL" >&2
echo "demo sign-in: http://127.0.0.1:8080/demo/sign-in/acct-1001 (Ann Lee) or /demo/sign-in/acct-1002 (Ben Ortiz)" >&2
HELPLINE_CUSTOMER_TOKEN_SECRET="$(secret data/demo/customer-token.secret)" \
  HELPLINE_ACTIONS_FILE=docs-corpus/actions.toml HELPLINE_DEMO_ACCOUNTS=acct-1001,acct-1002 scripts/run.sh "$@"
