#!/usr/bin/env bash
# One CI job end to end in a real VM, on a fresh Debian 12 machine (as root): installs the
# packages, builds hyperjob and the guest image (cached), starts the namespaced libvirt test
# environment, runs the demo job through the real hyperjob binary the way GitLab Runner does,
# prints the job log live and the time each stage took, and tears everything down.
set -euo pipefail

cd "$(dirname -- "$0")/.."
root=$(pwd)

scripts/install-deps.sh
image_dir=${HYPERJOB_IMAGE_DIR:-/var/lib/hyperjob-test/image}
scripts/build-guest-image.sh "$image_dir"
cargo build --release --locked --quiet --bin hyperjob --example demo

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
