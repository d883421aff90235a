#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine or a developer's, as root:
#   installs packages, builds the guest image (cached), builds and lints nothing else,
#   starts the namespaced libvirt test environment, runs every test (unit tests and the
#   end-to-end tests against real VMs), checks that nothing leaked, and tears down.
# Extra arguments go to `cargo test` after `--` (e.g. a test name filter).
set -euo pipefail

cd "$(dirname -- "$0")/.."
root=$(pwd)
# shellcheck source=scripts/lib/session.sh
. scripts/lib/session.sh

hj_prepare_host

# Build outside the namespace: inside it there is no route to crates.io.
cargo build --workspace --all-targets --locked --quiet
cargo test --workspace --locked --no-run --quiet

hj_start_session
export HYPERJOB_BIN="$root/target/debug/hyperjob"
# Built by `cargo build --workspace` above: the direct-QEMU backend, as a shared-library plugin.
export HYPERJOB_QEMU_PLUGIN="$root/target/debug/libhyperjob_backend_qemu.so"
started=$(date +%s)
scripts/testenv.sh exec cargo test --workspace --locked --offline --no-fail-fast -- "$@"
echo "test.sh: cargo test took $(( $(date +%s) - started )) s"
scripts/leak-check.sh
