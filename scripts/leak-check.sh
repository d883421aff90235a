#!/usr/bin/env bash
# Fails when anything a hyperjob test created is still there: libvirt domains named
# hyperjob-*, overlays or console logs in the test images dir, state files, or QEMU processes
# of hyperjob guests. Run at the end of scripts/test.sh, while the test libvirtd is still up.
set -euo pipefail

uri=${LIBVIRT_URI:-qemu:///system}
work_dir=${HYPERJOB_TEST_WORK_DIR:-/var/lib/hyperjob-test/work}
leaks=0

report() { echo "leak-check: $*" >&2; leaks=$((leaks + 1)); }

if domains=$(virsh -q -c "$uri" list --all --name 2>/dev/null); then
    while read -r name; do
        case "$name" in hyperjob-*) report "libvirt domain $name still exists" ;; esac
    done <<<"$domains"
else
    report "cannot list libvirt domains at $uri"
fi
if [ -d "$work_dir" ]; then
    while IFS= read -r -d '' file; do
        report "file $file still exists"
    done < <(find "$work_dir" -type f \( -name 'hyperjob-*' -o -name 'job-*' \) -print0)
fi
for proc in /proc/[0-9]*; do
    # The process may exit between listing and reading: skip it quietly.
    { cmdline=$(tr '\0' ' ' <"$proc/cmdline"); } 2>/dev/null || continue
    case "$cmdline" in
        *qemu-system*guest=hyperjob-*) report "QEMU process ${proc#/proc/} of a hyperjob guest still runs" ;;
    esac
done

if [ "$leaks" -gt 0 ]; then
    echo "leak-check: FAILED, $leaks leftover(s)" >&2
    exit 1
fi
echo "leak-check: no domains, overlays, state files or QEMU processes left"
