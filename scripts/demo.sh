#!/usr/bin/env bash
# One CI job end to end in a real VM, on a fresh Debian 12 machine (as root): installs the
# packages, builds hyperjob and the guest image (cached), starts the namespaced libvirt test
# environment, runs the demo job through the real hyperjob binary the way GitLab Runner does,
# prints the job log live and the time each stage took, and tears everything down.
#
#   scripts/demo.sh          the job through the built-in libvirt backend
#   scripts/demo.sh qemu     the same job through the direct-QEMU backend plugin (a .so)
set -euo pipefail

cd "$(dirname -- "$0")/.."
root=$(pwd)

scripts/install-deps.sh
image_dir=${HYPERJOB_IMAGE_DIR:-/var/lib/hyperjob-test/image}
scripts/build-guest-image.sh "$image_dir"
cargo build --release --locked --quiet --bin hyperjob --example demo
cargo build --release --locked --quiet -p hyperjob-backend-qemu
case "${1:-libvirt}" in
    libvirt) ;;
    qemu)
        export HYPERJOB_DEMO_BACKEND=qemu
        export HYPERJOB_QEMU_PLUGIN="$root/target/release/libhyperjob_backend_qemu.so"
        ;;
    *) echo "usage: scripts/demo.sh [libvirt|qemu]" >&2; exit 2 ;;
esac

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
export HYPERJOB_BIN="$root/target/release/hyperjob"
scripts/testenv.sh exec "$root/target/release/examples/demo"
