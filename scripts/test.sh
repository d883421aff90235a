#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine or a developer's, as root:
#   installs packages, builds the guest image (cached), builds and lints nothing else,
#   starts the namespaced libvirt test environment, runs every test (unit tests and the
#   end-to-end tests against real VMs), checks that nothing leaked, and tears down.
# Extra arguments go to `cargo test` after `--` (e.g. a test name filter).
set -euo pipefail

cd "$(dirname -- "$0")/.."
root=$(pwd)

scripts/install-deps.sh
image_dir=${HYPERJOB_IMAGE_DIR:-/var/lib/hyperjob-test/image}
scripts/build-guest-image.sh "$image_dir"

# Build outside the namespace: inside it there is no route to crates.io.
cargo build --workspace --all-targets --locked --quiet
cargo test --workspace --locked --no-run --quiet

export HYPERJOB_TESTENV_STATE=${HYPERJOB_TESTENV_STATE:-/run/hyperjob-testenv}
teardown() {
    local rc=$?
    "$root/scripts/testenv.sh" down || rc=1
    exit "$rc"
}
trap teardown EXIT
scripts/testenv.sh up

export HYPERJOB_TEST_ENV_FILE="$HYPERJOB_TESTENV_STATE/env"
export HYPERJOB_TEST_IMAGE_ENV="$image_dir/image.env"
export HYPERJOB_BIN="$root/target/debug/hyperjob"
# Built by `cargo build --workspace` above: the direct-QEMU backend, as a shared-library plugin.
export HYPERJOB_QEMU_PLUGIN="$root/target/debug/libhyperjob_backend_qemu.so"
started=$(date +%s)
scripts/testenv.sh exec cargo test --workspace --locked --offline --no-fail-fast -- "$@"
echo "test.sh: cargo test took $(( $(date +%s) - started )) s"
scripts/leak-check.sh
