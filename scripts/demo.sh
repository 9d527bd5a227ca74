#!/usr/bin/env bash
# The Spore demo: set up, build, start a daemon, deploy the sample functions, invoke them cold
# and warm, print the figures. Extra arguments go to `spore demo` (see `spore demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
export SPORE_PACKAGES_DIR=${SPORE_PACKAGES_DIR:-$PWD/target/python-packages}
echo "demo: building spore (release)"
cargo build --release --quiet
exec ./target/release/spore demo "$@"
