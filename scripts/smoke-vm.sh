#!/usr/bin/env bash
# End-to-end smoke test of the test environment and guest image, without hyperjob:
# boots one transient guest from an overlay of the cached image inside the test namespace,
# logs in over SSH with host-key checking on, clones a repository from a `git daemon` on the
# bridge address, prints timings, and cleans up after itself.
#
#   scripts/testenv.sh up && scripts/smoke-vm.sh [IMAGE_DIR]
#
# Environment (all optional): HYPERJOB_IMAGE_DIR (/var/lib/hyperjob-test/image),
# HYPERJOB_TESTENV_STATE (/run/hyperjob-testenv), HYPERJOB_DOMAIN_TYPE (qemu; kvm on real
# hardware), HYPERJOB_SMOKE_MEMORY_MB (512), HYPERJOB_SMOKE_VCPUS (1),
# HYPERJOB_SMOKE_TIMEOUT (120 s per wait), HYPERJOB_SMOKE_WORKDIR_PARENT (/var/tmp; must be
# world-searchable), HYPERJOB_SMOKE_MAC (libvirt picks one), HYPERJOB_SMOKE_KEEP=1 keeps the
# work directory (console log).
set -euo pipefail

PROG=$(basename -- "$0")
readonly PROG
die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

IMAGE_DIR=${1:-${HYPERJOB_IMAGE_DIR:-/var/lib/hyperjob-test/image}}
STATE_DIR=${HYPERJOB_TESTENV_STATE:-/run/hyperjob-testenv}
DOMAIN_TYPE=${HYPERJOB_DOMAIN_TYPE:-qemu}
MEMORY_MB=${HYPERJOB_SMOKE_MEMORY_MB:-512}
VCPUS=${HYPERJOB_SMOKE_VCPUS:-1}
TIMEOUT=${HYPERJOB_SMOKE_TIMEOUT:-120}
WORK_PARENT=${HYPERJOB_SMOKE_WORKDIR_PARENT:-/var/tmp}
MAC=${HYPERJOB_SMOKE_MAC:-}

[ "$(id -u)" -eq 0 ] || die "must run as root"
[ -s "$STATE_DIR/env" ] || die "no $STATE_DIR/env: run scripts/testenv.sh up first"
[ -s "$IMAGE_DIR/image.env" ] || die "no $IMAGE_DIR/image.env: run scripts/build-guest-image.sh first"
# shellcheck source=/dev/null
. "$STATE_DIR/env"
# shellcheck source=/dev/null
. "$IMAGE_DIR/image.env"

virsh_() { virsh -q -c "$LIBVIRT_URI" "$@"; }
in_ns() { ip netns exec "$NETNS" "$@"; }
ssh_guest() {
    in_ns ssh -i "$IDENTITY_FILE" -o UserKnownHostsFile="$KNOWN_HOSTS" \
        -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes \
        -o ConnectTimeout=3 -o LogLevel=ERROR "$GUEST_USER@$GUEST_IP" "$@"
}

work=$(mktemp -d "$WORK_PARENT/hyperjob-smoke.XXXXXX")
chmod 0755 "$work"
domain=hyperjob-smoke-$(basename "$work" | cut -d. -f2 | tr '[:upper:]' '[:lower:]')
git_daemon_pid=
cleanup() {
    local rc=$?
    if [ -n "$git_daemon_pid" ] && kill -0 "$git_daemon_pid" 2>/dev/null; then
        kill "$git_daemon_pid" 2>/dev/null || true
    fi
    virsh_ destroy "$domain" >/dev/null 2>&1 || true
    if [ "${HYPERJOB_SMOKE_KEEP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
        log "work directory kept: $work (console.log = guest serial console)"
    else
        rm -rf -- "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT

qemu-img create -q -f qcow2 -F qcow2 -b "$BASE_IMAGE" "$work/overlay.qcow2"
mac_xml=
[ -z "$MAC" ] || mac_xml="
      <mac address='$MAC'/>"
cat >"$work/domain.xml" <<EOF
<domain type='$DOMAIN_TYPE'>
  <name>$domain</name>
  <memory unit='MiB'>$MEMORY_MB</memory>
  <vcpu>$VCPUS</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>$KERNEL</kernel>
    <initrd>$INITRD</initrd>
    <cmdline>$CMDLINE</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$work/overlay.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='$NETWORK'/>$mac_xml
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='$work/console.log'/>
      <target port='0'/>
    </serial>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>
    <memballoon model='none'/>
  </devices>
</domain>
EOF

t0=$(now)
virsh_ create "$work/domain.xml" >/dev/null || die "virsh create failed (domain XML: $work/domain.xml)"
log "created $domain ($DOMAIN_TYPE, ${MEMORY_MB} MiB, $VCPUS vCPU)"

GUEST_IP=
until [ -n "$GUEST_IP" ]; do
    GUEST_IP=$(virsh_ domifaddr "$domain" --source lease 2>/dev/null |
        awk '$3 == "ipv4" { split($4, a, "/"); print a[1]; exit }')
    [ -n "$GUEST_IP" ] && break
    awk -v s="$(since "$t0")" -v t="$TIMEOUT" 'BEGIN { exit !(s > t) }' &&
        die "no DHCP lease for $domain after ${TIMEOUT} s (see $work/console.log)"
    sleep 0.2
done
t_addr=$(since "$t0")
log "address $GUEST_IP after ${t_addr} s"

until ssh_guest true 2>/dev/null; do
    awk -v s="$(since "$t0")" -v t="$TIMEOUT" 'BEGIN { exit !(s > t) }' &&
        die "no SSH login to $GUEST_IP after ${TIMEOUT} s (see $work/console.log)"
    sleep 0.2
done
t_ssh=$(since "$t0")
log "ssh ready after ${t_ssh} s"

# shellcheck disable=SC2016  # expanded by the guest's shell
ssh_guest 'bash -c "id; git --version; echo PATH=\$PATH; echo ok"'

# git:// from the guest to a git daemon on the bridge address (inside the namespace).
mkdir -p "$work/git/src"
git -C "$work/git/src" init -q -b main
echo "hyperjob smoke" >"$work/git/src/README"
git -C "$work/git/src" add README
git -C "$work/git/src" -c user.name=smoke -c user.email=smoke@invalid commit -q -m smoke
git clone -q --bare "$work/git/src" "$work/git/repo.git"
in_ns git daemon --listen="$BRIDGE_IP" --port=9418 --base-path="$work/git" --export-all \
    --reuseaddr --detach --pid-file="$work/git-daemon.pid" "$work/git"
for _ in $(seq 50); do [ -s "$work/git-daemon.pid" ] && break; sleep 0.1; done
git_daemon_pid=$(cat "$work/git-daemon.pid")
t_clone=$(now)
out=$(ssh_guest "rm -rf builds/smoke && git clone -q git://$BRIDGE_IP/repo.git builds/smoke && cat builds/smoke/README") ||
    die "git clone git://$BRIDGE_IP/repo.git failed in the guest"
[ "$out" = "hyperjob smoke" ] || die "unexpected clone content: $out"
log "git clone git://$BRIDGE_IP/repo.git in the guest: ok ($(since "$t_clone") s)"
kill "$git_daemon_pid"
git_daemon_pid=

# PID 1 must reap orphans: leave one behind, let it exit, count zombies.
zombies=$(ssh_guest 'setsid sh -c "sleep 0.3 &"; sleep 1.5; ps -eo stat= | grep -c "^Z" || true')
[ "$zombies" = 0 ] || die "the guest has $zombies zombie process(es): PID 1 does not reap"
log "orphans are reaped (0 zombies)"

# ACPI power button (optional feature of the image): virsh shutdown -> guest powers off.
t_off=$(now)
virsh_ shutdown "$domain" >/dev/null 2>&1 || true
off=
for _ in $(seq 150); do
    virsh_ domstate "$domain" >/dev/null 2>&1 || { off=1; break; }
    sleep 0.2
done
if [ -n "$off" ]; then
    log "virsh shutdown: guest powered off after $(since "$t_off") s"
else
    log "warning: guest ignored virsh shutdown for 30 s (destroying it)"
fi

echo "smoke: create->address ${t_addr} s, create->ssh ${t_ssh} s"
