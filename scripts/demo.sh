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
# shellcheck source=scripts/lib/session.sh
. scripts/lib/session.sh

hj_prepare_host
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

hj_start_session
export HYPERJOB_BIN="$root/target/release/hyperjob"
scripts/testenv.sh exec "$root/target/release/examples/demo"
