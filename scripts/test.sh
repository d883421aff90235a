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
# The runner's per-job temporary files (the harness's custom-executor* dirs with the
# response file) go to a directory of this run's own, so the leak check can see every one.
HYPERJOB_TEST_TMPDIR=$(mktemp -d /tmp/hyperjob-test-tmp.XXXXXX)
chmod 0755 "$HYPERJOB_TEST_TMPDIR"
export HYPERJOB_TEST_TMPDIR TMPDIR=$HYPERJOB_TEST_TMPDIR
started=$(date +%s)
rc=0
scripts/testenv.sh exec cargo test --workspace --locked --offline --no-fail-fast -- "$@" || rc=$?
echo "test.sh: cargo test took $(( $(date +%s) - started )) s (exit $rc)"
# The leak check runs whatever the tests did, and a leak fails the run even when they passed.
scripts/leak-check.sh || rc=1
rm -rf -- "$HYPERJOB_TEST_TMPDIR"
if [ "$rc" -ne 0 ]; then
    echo "test.sh: FAILED" >&2
fi
exit "$rc"
