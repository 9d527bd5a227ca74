#!/usr/bin/env bash
# Idempotent set-up for Spore on a fresh Debian/Ubuntu machine: Debian packages (the sandbox's
# Python, pip, a font for plots, iproute2 and etcd for the units tests, nftables for network egress, prometheus for promtool, chromium and its driver for the dashboard test, wrk for the throughput bench) and the Python packages
# of the sample functions (numpy, Pillow, pyaes) in a shared directory that sandboxes bind
# read-only.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

need=()
for pkg in python3 python3-pip fonts-dejavu-core iproute2 util-linux nftables etcd-server prometheus chromium chromium-driver wrk; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "setup: installing Debian packages: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is not installed; install a stable Rust toolchain (https://rustup.rs) and run again" >&2
  exit 1
fi

pkg_dir=${SPORE_PACKAGES_DIR:-$PWD/target/python-packages}
stamp="$pkg_dir/.requirements.sha256"
want=$(sha256sum functions/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the sample functions' Python packages into $pkg_dir"
  rm -rf "$pkg_dir"
  mkdir -p "$pkg_dir"
  # The sandbox runs /usr/bin/python3, so its own pip picks matching wheels.
  /usr/bin/python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --root-user-action=ignore --target "$pkg_dir" -r functions/requirements.txt
  chmod -R a+rX "$pkg_dir"
  echo "$want" >"$stamp"
fi
test_dir=${SPORE_TEST_PYTHON:-$PWD/target/test-python}
test_req=crates/spore/tests/requirements-test.txt
stamp="$test_dir/.requirements.sha256"
want=$(sha256sum "$test_req" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the test suite's Python packages (boto3) into $test_dir"
  rm -rf "$test_dir"
  mkdir -p "$test_dir"
  /usr/bin/python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --root-user-action=ignore --target "$test_dir" -r "$test_req"
  echo "$want" >"$stamp"
fi
# An offline package index for dependency builds in the tests (`spore serve
# --build-index-dir`): wheels of a pure-Python package and of one with a compiled extension
# for the host's /usr/bin/python3, and an npm cache with two small packages.
index_dir=${SPORE_BUILD_INDEX_DIR:-$PWD/target/build-index}
stamp="$index_dir/.stamp"
want="v1 six==1.17.0 MarkupSafe==3.0.2 semver@7.6.3 ms@2.1.3 $(/usr/bin/python3 -c 'import sys; print(sys.version_info[:2])')"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: preparing the offline build index in $index_dir"
  rm -rf "$index_dir"
  mkdir -p "$index_dir/npm"
  /usr/bin/python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    -d "$index_dir" six==1.17.0 MarkupSafe==3.0.2
  if command -v npm >/dev/null; then
    npm cache add --cache "$index_dir/npm" semver@7.6.3 ms@2.1.3 >/dev/null
  fi
  chmod -R a+rX "$index_dir"
  echo "$want" >"$stamp"
fi
echo "setup: ready (packages: $pkg_dir, test packages: $test_dir, build index: $index_dir)"
