#!/usr/bin/env bash
# Baseline cleanup: ask the guest to shut down (and return at once), undefine the domain, remove
# the disk. The guest keeps running until it has shut itself down; scripts/bench.sh destroys
# whatever is left after the measurement.
here=$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/bench-baseline/base.sh
. "$here/base.sh"
set -eo pipefail

virsh -q shutdown "$vm_id" >/dev/null
virsh -q undefine "$vm_id" >/dev/null
if [ -f "$vm_disk" ]; then
    rm -- "$vm_disk"
fi
