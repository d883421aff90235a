#!/usr/bin/env bash
# Fails when anything a hyperjob test created is still there: libvirt domains named
# hyperjob-*; any file below the tests' work dir (overlays, console logs, seeds, state and
# lock files, per-job key directories, configs); the runner's per-job temporary directories
# (custom-executor*, with the job response file) in $HYPERJOB_TEST_TMPDIR; QEMU processes of
# hyperjob guests; and processes of the hyperjob binary under test ($HYPERJOB_BIN).
# Run at the end of scripts/test.sh, while the test libvirtd is still up.
set -euo pipefail

uri=${LIBVIRT_URI:-qemu:///system}
work_dir=${HYPERJOB_TEST_WORK_DIR:-/var/lib/hyperjob-test/work}
leaks=0

report() { echo "leak-check: $*" >&2; leaks=$((leaks + 1)); }

# cleanup leaves the slow part of a VM's removal to a detached `hyperjob finish-cleanup`
# (seconds): give those of the last tests up to 120 s to finish before anything counts.
finishers() {
    local proc cmdline
    for proc in /proc/[0-9]*; do
        { cmdline=$(tr '\0' ' ' <"$proc/cmdline"); } 2>/dev/null || continue
        case "$cmdline" in *" finish-cleanup "*) return 0 ;; esac
    done
    return 1
}
for _ in $(seq 1200); do
    finishers || break
    sleep 0.1
done

if domains=$(virsh -q -c "$uri" list --all --name 2>/dev/null); then
    while read -r name; do
        case "$name" in hyperjob-*) report "libvirt domain $name still exists" ;; esac
    done <<<"$domains"
else
    report "cannot list libvirt domains at $uri"
fi
if [ -d "$work_dir" ]; then
    # Every test removes what it wrote; empty directories may stay.
    while IFS= read -r -d '' file; do
        report "file $file still exists"
    done < <(find "$work_dir" ! -type d -print0)
    # Per-job key directories and seed work directories, even when empty.
    while IFS= read -r -d '' dir; do
        report "directory $dir still exists"
    done < <(find "$work_dir" -type d \( -name 'job-*.keys' -o -name '.hyperjob-*' \) -print0)
fi
tmp_dir=${HYPERJOB_TEST_TMPDIR:-}
if [ -n "$tmp_dir" ] && [ -d "$tmp_dir" ]; then
    while IFS= read -r -d '' dir; do
        report "runner temporary directory $dir (job response file) still exists"
    done < <(find "$tmp_dir" -mindepth 1 -maxdepth 1 -name 'custom-executor*' -print0)
fi
hyperjob_bin=${HYPERJOB_BIN:-}
for proc in /proc/[0-9]*; do
    # The process may exit between listing and reading: skip it quietly.
    { cmdline=$(tr '\0' ' ' <"$proc/cmdline"); } 2>/dev/null || continue
    case "$cmdline" in
        *qemu-system*guest=hyperjob-*) report "QEMU process ${proc#/proc/} of a hyperjob guest still runs" ;;
    esac
    if [ -n "$hyperjob_bin" ] && [ "$(readlink "$proc/exe" 2>/dev/null)" = "$hyperjob_bin" ]; then
        report "hyperjob process ${proc#/proc/} ($cmdline) still runs"
    fi
done

if [ "$leaks" -gt 0 ]; then
    echo "leak-check: FAILED, $leaks leftover(s)" >&2
    exit 1
fi
echo "leak-check: no domains, files, key directories, runner temporary directories, QEMU or hyperjob processes left"
