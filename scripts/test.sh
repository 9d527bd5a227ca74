#!/usr/bin/env bash
# The whole Spore test suite: set-up, formatting, lints, unit and integration tests.
# As root, tests that need root and cgroups must run (SPORE_REQUIRE_ROOT=1 turns their skip
# into a failure); as another user they skip with a printed reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
export SPORE_PACKAGES_DIR=${SPORE_PACKAGES_DIR:-$PWD/target/python-packages}
if [ "$(id -u)" -eq 0 ]; then
  export SPORE_REQUIRE_ROOT=1
fi
echo "test: cargo fmt --check"
cargo fmt --all -- --check
echo "test: cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "test: cargo test"
cargo test --workspace
