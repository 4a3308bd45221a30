#!/usr/bin/env bash
# Runs the whole test suite: builds in release (dependencies and kernels optimized), fetches and
# verifies the default model and the Gemma 3 test model, installs Chromium for the chat page's browser
# tests when missing, starts a throwaway PostgreSQL for the conversation store's tests, then runs every
# unit and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# The chat page's browser tests drive headless Chromium through chromedriver (Debian packages).
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  as_root=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "installing chromium needs root or sudo" >&2; exit 1; }
    as_root=(sudo)
  fi
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver
fi
# The conversation store's tests run against SQLite and a real PostgreSQL server (Debian's package,
# installed when missing); a throwaway cluster on loopback, stopped when the tests end.
if [ -z "${HELPLINE_TEST_POSTGRES_URL:-}" ]; then
  HELPLINE_TEST_POSTGRES_URL=$(scripts/postgres.sh start "" 54329 | tail -n1)
  export HELPLINE_TEST_POSTGRES_URL
  trap 'scripts/postgres.sh stop "" 54329 >/dev/null 2>&1 || true' EXIT
fi
cargo build --release --locked
target/release/helpline models pull
python3 -m pip install --quiet --disable-pip-version-check 'openai>=1.40' 'numpy>=1.24'
cargo test --release --locked "$@"
