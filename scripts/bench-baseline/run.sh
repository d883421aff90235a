#!/usr/bin/env bash
# Baseline run: look the address up again, feed the script to bash over a new ssh connection;
# any failure is a build failure (the documented driver drops the exit code).
here=$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/bench-baseline/base.sh
. "$here/base.sh"

if ! vm_ssh "$(vm_ip)" /bin/bash <"$1"; then
    exit "$BUILD_FAILURE_EXIT_CODE"
fi
