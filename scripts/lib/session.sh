# shellcheck shell=bash
# shellcheck disable=SC2154  # $root is set by the script that sources this file
# Sourced by scripts/test.sh and scripts/demo.sh (with $root set to the repository): the
# guest image and one session of the namespaced test environment, torn down on exit.

hj_image_dir=${HYPERJOB_IMAGE_DIR:-/var/lib/hyperjob-test/image}
export HYPERJOB_TESTENV_STATE=${HYPERJOB_TESTENV_STATE:-/run/hyperjob-testenv}

# Installs the packages and builds (or reuses) the guest image.
hj_prepare_host() {
    "$root/scripts/install-deps.sh"
    "$root/scripts/build-guest-image.sh" "$hj_image_dir"
}

hj_teardown() {
    local rc=$?
    "$root/scripts/testenv.sh" down || rc=1
    exit "$rc"
}

# Starts the environment (stopped again when the calling script exits) and exports what the
# tests and the demo read: HYPERJOB_TEST_ENV_FILE, HYPERJOB_TEST_IMAGE_ENV.
hj_start_session() {
    trap hj_teardown EXIT
    "$root/scripts/testenv.sh" up
    export HYPERJOB_TEST_ENV_FILE="$HYPERJOB_TESTENV_STATE/env"
    export HYPERJOB_TEST_IMAGE_ENV="$hj_image_dir/image.env"
}
