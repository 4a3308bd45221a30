#!/usr/bin/env bash
# Fuzzes a running Helpline server against its own OpenAPI document with schemathesis (PyPI), in
# all four phases (examples, coverage, fuzzing, stateful), once per scope: as a customer (no key),
# with the agent key and with the admin key. Each pass is bounded by time; the run fails on any
# response of 500 or above and on any response that breaks the spec.
#
#   scripts/schemathesis.sh [SECONDS_PER_PASS]      (default 120)
#
# The server runs on a throwaway copy of docs-corpus and a throwaway data directory, with small
# generation limits so that fuzzed chat requests finish quickly. Reports (JUnit XML and the
# console output) go to target/schemathesis/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
seconds=${1:-120}
cargo build --release --locked
target/release/helpline models pull >/dev/null
python3 -m pip install --quiet --disable-pip-version-check 'schemathesis>=4,<5'

work=$(mktemp -d)
out=target/schemathesis
mkdir -p "$out"
cp -r docs-corpus "$work/docs"
agent_key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
admin_key=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/release/helpline serve --port "$port" --docs-dir "$work/docs" --index-dir "$work/index" \
  --data-dir "$work/data" --agent-api-key "$agent_key" --admin-api-key "$admin_key" \
  --max-tokens-limit 64 --default-max-tokens 8 --log warn >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$work"' EXIT
base="http://127.0.0.1:$port"
for _ in $(seq 1 300); do
  curl -fsS "$base/ready" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { cat "$out/server.log" >&2; exit 1; }
  sleep 1
done

status=0
for pass in customer agent admin; do
  auth=()
  case $pass in
    agent) auth=(-H "Authorization: Bearer $agent_key") ;;
    admin) auth=(-H "Authorization: Bearer $admin_key") ;;
  esac
  echo "== schemathesis as $pass, ${seconds}s" >&2
  # not_a_server_error: no 5xx. status_code / content_type / response_headers / response_schema
  # conformance: every response is one the document declares, in the shape it declares.
  # negative_data_rejection: what the document forbids is refused.
  if ! st run "$base/openapi.json" --url "$base" "${auth[@]}" \
      --phases examples,coverage,fuzzing,stateful --max-time "$seconds" --workers 2 \
      --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection \
      --request-timeout 120 --suppress-health-check all \
      --report junit --report-dir "$out/$pass" 2>&1 | tee "$out/$pass.log"; then
    status=1
  fi
done
grep -E "panicked|ERROR" "$out/server.log" | head -20 >&2 || true
exit $status
