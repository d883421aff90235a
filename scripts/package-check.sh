#!/usr/bin/env bash
# Builds the Debian package (scripts/package.sh), installs it with dpkg -i, and checks the
# installed /usr/bin/hyperjob on the test environment: `hyperjob doctor` (healthy setup, and
# --boot) and one whole job through the real runner flow. Prints the time from install to the
# end of the first job. Removes the package again. As root, after scripts/test.sh (CI).
set -euo pipefail

cd "$(dirname -- "$0")/.."
root=$(pwd)
# shellcheck source=scripts/lib/session.sh
. scripts/lib/session.sh

hj_prepare_host
deb=$(scripts/package.sh)
echo "package-check: built $deb ($(du -h "$deb" | cut -f1))"
cargo test --locked --quiet --no-run --test e2e_doctor --test e2e_libvirt

installed=$(date +%s.%N)
dpkg -i "$deb" >/dev/null
trap 'dpkg -P hyperjob >/dev/null 2>&1 || true; hj_teardown' EXIT
[ "$(stat -c %a /etc/hyperjob/config.toml)" = 600 ] ||
    { echo "package-check: /etc/hyperjob/config.toml is not 0600" >&2; exit 1; }
/usr/bin/hyperjob --version

"$root/scripts/testenv.sh" up
export HYPERJOB_TEST_ENV_FILE="$HYPERJOB_TESTENV_STATE/env"
export HYPERJOB_TEST_IMAGE_ENV="$hj_image_dir/image.env"
export HYPERJOB_BIN=/usr/bin/hyperjob
scripts/testenv.sh exec cargo test --locked --offline --test e2e_libvirt -- \
    --exact job_runs_every_stage_inside_a_fresh_vm_and_cleanup_removes_it
first_job=$(date +%s.%N)
# The doctor tests of the libvirt setup (the QEMU plugin library of this tree is not part of
# the package): a healthy setup with --boot, and the broken ones.
scripts/testenv.sh exec cargo test --locked --offline --test e2e_doctor -- --nocapture \
    doctor_passes_on_a_healthy_setup each_broken_setup_is_named
scripts/leak-check.sh
awk -v a="$installed" -v b="$first_job" 'BEGIN {
    printf "package-check: install to the end of the first job through /usr/bin/hyperjob: %.1f s\n", b - a }'
