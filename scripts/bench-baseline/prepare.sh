#!/usr/bin/env bash
# Baseline prepare: overlay disk, virt-install, then poll for the address and for SSH once a
# second, 30 tries each (as the documented driver does).
here=$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/bench-baseline/base.sh
. "$here/base.sh"
set -eo pipefail
trap 'exit "$SYSTEM_FAILURE_EXIT_CODE"' ERR

qemu-img create -q -f qcow2 -F qcow2 -b "$BASELINE_BASE_IMAGE" "$vm_disk"
virt-install --name "$vm_id" --os-variant debian11 --disk "$vm_disk" --import \
    --boot "kernel=$BASELINE_KERNEL,initrd=$BASELINE_INITRD,kernel_args=$BASELINE_CMDLINE" \
    --virt-type qemu --vcpus "$BASELINE_VCPUS" --memory "$BASELINE_MEMORY_MIB" \
    --network "network=$BASELINE_NETWORK" --graphics none --noautoconsole >/dev/null

echo "Waiting for VM to get IP"
ip=
for try in $(seq 1 30); do
    ip=$(vm_ip)
    [ -z "$ip" ] || break
    if [ "$try" = 30 ]; then
        echo "Waited 30 seconds for VM to start, exiting..."
        exit "$SYSTEM_FAILURE_EXIT_CODE"
    fi
    sleep 1
done
echo "VM got IP: $ip"

echo "Waiting for sshd to be available"
for try in $(seq 1 30); do
    if vm_ssh "$ip" true </dev/null >/dev/null 2>&1; then
        break
    fi
    if [ "$try" = 30 ]; then
        echo "Waited 30 seconds for sshd to start, exiting..."
        exit "$SYSTEM_FAILURE_EXIT_CODE"
    fi
    sleep 1
done
