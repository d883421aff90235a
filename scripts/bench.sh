#!/usr/bin/env bash
# The benchmark (not part of the test suite: it prints figures and asserts nothing): hyperjob
# against a baseline doing what GitLab's documented libvirt shell driver does, on the same guest
# image in the same run, both driven as GitLab Runner drives a Custom executor. Prints medians of
# cold prepare, warm prepare (pool), per-stage overhead, cleanup, the whole demo job and K
# concurrent jobs, with hyperjob/baseline ratios; see examples/bench/main.rs.
#
#   scripts/bench.sh [--rounds N] [--concurrent K] [--stages M]     (defaults 5, 4, 5; as root)
#
# Uses the namespaced test environment when it is up (and leaves it up); otherwise starts it the
# way scripts/test.sh does and tears it down at the end. Installs the packages it needs (the
# baseline's virt-install too) and builds the guest image (cached) first.
set -euo pipefail

cd "$(dirname -- "$0")/.."
root=$(pwd)
# shellcheck source=scripts/lib/session.sh
. scripts/lib/session.sh

hj_prepare_host
cargo build --release --locked --quiet --bin hyperjob --example bench

if scripts/testenv.sh status >/dev/null 2>&1; then
    echo "bench.sh: using the test environment that is up (left up)"
    export HYPERJOB_TEST_ENV_FILE="$HYPERJOB_TESTENV_STATE/env"
    export HYPERJOB_TEST_IMAGE_ENV="$hj_image_dir/image.env"
else
    hj_start_session
fi
export HYPERJOB_BIN="$root/target/release/hyperjob"
scripts/testenv.sh exec "$root/target/release/examples/bench" "$@"
