# shellcheck shell=bash
# Sourced by the baseline's prepare.sh, run.sh and cleanup.sh: what GitLab's documented libvirt
# driver for the Custom executor does (shared/reference/seed-libvirt-driver.md), rewritten for
# scripts/bench.sh. Paths come from the bench instead of /var/lib/libvirt/images and /root/.ssh.
#
# Environment (set by the bench): BASELINE_IMAGES_DIR, BASELINE_BASE_IMAGE, BASELINE_KERNEL,
# BASELINE_INITRD, BASELINE_CMDLINE (the same guest image hyperjob boots, booted the same way),
# BASELINE_IDENTITY_FILE, BASELINE_KNOWN_HOSTS (where ssh records host keys it accepts
# unchecked), BASELINE_USER, BASELINE_NETWORK, BASELINE_VCPUS, BASELINE_MEMORY_MIB and
# LIBVIRT_DEFAULT_URI.

vm_id="runner-${CUSTOM_ENV_CI_RUNNER_ID}-project-${CUSTOM_ENV_CI_PROJECT_ID}-concurrent-${CUSTOM_ENV_CI_CONCURRENT_PROJECT_ID}-job-${CUSTOM_ENV_CI_JOB_ID}"
vm_disk="$BASELINE_IMAGES_DIR/$vm_id.qcow2"

# The guest's address as libvirt's lease table has it (a new `virsh` every time).
vm_ip() {
    virsh -q domifaddr "$vm_id" 2>/dev/null | awk 'NR == 1 { sub(/\/[0-9]*$/, "", $4); print $4 }'
}

# The driver's ssh: host keys accepted unchecked, one new connection per call.
vm_ssh() {
    ssh -i "$BASELINE_IDENTITY_FILE" -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile="$BASELINE_KNOWN_HOSTS" -o LogLevel=ERROR \
        "$BASELINE_USER@$1" "${@:2}"
}
