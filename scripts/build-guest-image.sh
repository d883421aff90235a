#!/usr/bin/env bash
# Builds the small Debian test guest used by hyperjob's end-to-end tests and caches it.
#
#   scripts/build-guest-image.sh [OUT_DIR]
#
# OUT_DIR (default $HYPERJOB_IMAGE_DIR, else /var/lib/hyperjob-test/image) receives:
#   base.qcow2              ext4 root file system directly on /dev/vda (no partition table)
#   vmlinuz, initrd.img     linux-image-cloud-amd64 kernel + initramfs, for direct kernel boot
#   bootable.qcow2          whole disk for BIOS boot (<boot dev='hd'/>): MBR + SYSLINUX, vda1 =
#                           FAT16 with SYSLINUX, kernel and initrd, vda2 = the same ext4 root fs
#   id_ed25519(.pub)        client key pair; the public half is in gitlab-runner's authorized_keys
#   known_hosts             the guest's baked SSH host key(s), "* <type> <base64>" per line
#   ssh_host_ed25519_key    that host key's private half (dropbear format), reused on rebuilds
#   cloudinit.qcow2         ext4 root file system (like base.qcow2) of another guest, with
#                           Debian's cloud-init and OpenSSH instead of dropbear, no SSH key and
#                           no CI user: both come from a cloud-init NoCloud seed (a second disk
#                           or CD-ROM labelled cidata) at boot. Same vmlinuz/initrd.img.
#   image.env               shell-sourceable facts (KERNEL, INITRD, CMDLINE, BASE_IMAGE,
#                           BOOTABLE_IMAGE, CLOUDINIT_IMAGE, ...)
#   stamp                   written last; names the script version and build parameters
# >>> stock.qcow2
#   stock.qcow2             a guest as stock cloud images are: Debian with systemd as PID 1,
#                           OpenSSH started by Debian's ssh.service, cloud-init with its four
#                           systemd stages, systemd-networkd. Three baked host keys (ed25519,
#                           ecdsa, rsa); gitlab-runner with id_ed25519.pub. Same vmlinuz/initrd.img.
#   stock_known_hosts       those three host keys, "* <type> <base64>" per line
#   stock_ssh_host_{ed25519,ecdsa,rsa}_key
#                           their private halves (OpenSSH format), reused on rebuilds
#   stock.stamp             stock.qcow2's own stamp, written last. Code used only for stock.qcow2
#                           sits between '# >>> stock.qcow2' and '# <<< stock.qcow2' lines; the
#                           stamp of the images above hashes the script without those blocks,
#                           so a change to stock.qcow2 alone never rebuilds (or replaces) them.
#                           A machine that has the other images builds only stock.qcow2 and
#                           adds STOCK_IMAGE, STOCK_CMDLINE, STOCK_KNOWN_HOSTS to image.env.
# <<< stock.qcow2
#
# A complete image built by the same script version with the same parameters is reused as is.
# Tunables (all optional): HYPERJOB_IMAGE_SUITE (bookworm), HYPERJOB_IMAGE_MIRROR
# (http://deb.debian.org/debian), HYPERJOB_IMAGE_FREE_MB (1536: free space in the root fs),
# HYPERJOB_GUEST_HOSTNAME (hyperjob-guest), HYPERJOB_IMAGE_EXTRA_PACKAGES (comma-separated),
# HYPERJOB_IMAGE_NEW_KEYS=1 (new SSH keys instead of reusing those of the image being replaced).
set -euo pipefail

readonly GUEST_USER=gitlab-runner
readonly CMDLINE='root=/dev/vda rw console=ttyS0 net.ifnames=0'
readonly CLOUDINIT_CMDLINE=$CMDLINE
# bootable.qcow2: SYSLINUX boots the same kernel with the root file system on partition 2.
readonly BOOT_CMDLINE='root=/dev/vda2 rw console=ttyS0 net.ifnames=0'
readonly BOOT_PART_MB=64
readonly SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin
readonly HOST_KEY=/etc/dropbear/dropbear_ed25519_host_key
readonly REQUIRED_FILES="base.qcow2 bootable.qcow2 cloudinit.qcow2 vmlinuz initrd.img id_ed25519
    id_ed25519.pub known_hosts ssh_host_ed25519_key image.env stamp"
# >>> stock.qcow2
readonly STOCK_CMDLINE=$CMDLINE
readonly STOCK_KEY_TYPES="ed25519 ecdsa rsa"
readonly STOCK_REQUIRED_FILES="stock.qcow2 stock_known_hosts stock_ssh_host_ed25519_key
    stock_ssh_host_ecdsa_key stock_ssh_host_rsa_key stock.stamp"
# <<< stock.qcow2

SELF=$(readlink -f -- "${BASH_SOURCE[0]}")
readonly SELF
PROG=$(basename -- "$SELF")
readonly PROG

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

# ---------------------------------------------------------------------------------------------
# Guest files. These run inside mmdebstrap hooks (the script calls itself, see main below).
# ---------------------------------------------------------------------------------------------

# Runs after the essential packages are unpacked, before the kernel and initramfs-tools are
# installed: keep the initramfs small (only what mounting /dev/vda needs) so TCG boots fast.
essential_hook() {
    local root=$1
    install -d -m 0755 "$root/etc/initramfs-tools/conf.d" "$root/etc/initramfs-tools/hooks"
    printf 'MODULES=list\n' >"$root/etc/initramfs-tools/conf.d/hyperjob.conf"
    cat >"$root/etc/initramfs-tools/hooks/hyperjob" <<'EOF'
#!/bin/sh
# hyperjob test guest: the root file system is ext4 on a virtio disk.
case "$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk crc32c_generic ext4; do
    force_load "$m"
done
EOF
    chmod 0755 "$root/etc/initramfs-tools/hooks/hyperjob"
}

# Everything both guests share, written into the tree $1: PID 1 (/etc/hyperjob/init) up to and
# including the network, its udhcpc script, the ACPI power button handler, hostname and hosts.
# $2 (dropbear|cloudinit) picks how PID 1 ends (what runs before busybox init, and its inittab).
guest_system() {
    local root=$1 variant=$2 hostname=$3

    # --- PID 1 -------------------------------------------------------------------------------
    install -d -m 0755 "$root/etc/hyperjob"
    {
        cat <<'EOF'
#!/bin/sh
# PID 1 of the hyperjob test guest (no systemd). Sets up the basics, then hands over to
# busybox init, which starts the SSH daemon from /etc/inittab and reaps orphaned processes.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umask 022

mounted() { grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null; }
[ -e /proc/self ] || mount -t proc -o nosuid,nodev,noexec proc /proc
mounted /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mounted /dev || mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts -o gid=5,mode=0620,ptmxmode=0666,nosuid,noexec devpts /dev/pts
mounted /dev/shm || mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mounted /run || mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mounted /tmp || mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd

cat /etc/hostname >/proc/sys/kernel/hostname
say() { echo "hyperjob-init: [$(cut -d' ' -f1 /proc/uptime)] $*" >/dev/console; }
say "root file system up"

# No udev here: load the drivers ourselves. virtio_rng feeds the kernel's entropy pool when
# the domain has <rng model='virtio'> (else the SSH daemon waits for "kernel randomness" under
# TCG); button + evdev let busybox acpid see the ACPI power button.
modprobe -q virtio_net || say "modprobe virtio_net failed"
for m in virtio_rng button evdev; do
    modprobe -q "$m" || true
done

start_network() {
    busybox ip link set lo up
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ "$i" -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if [ -e /sys/class/net/eth0 ]; then
        busybox ip link set eth0 up
        # Backgrounds itself once it holds a lease (or after the first tries, then keeps trying).
        busybox udhcpc -i eth0 -s /etc/hyperjob/udhcpc.script -b -t 5 -T 1 -A 2 \
            -x "hostname:$(cat /etc/hostname)"
    else
        say "no eth0 after 10 s"
    fi
}

EOF
        case $variant in
        dropbear)
            cat <<'EOF'
start_network

# Optional: ACPI power button -> SIGUSR2 to PID 1 (busybox init powers off).
busybox acpid -c /etc/acpi >/dev/null 2>&1 || true

say "starting busybox init (dropbear from /etc/inittab)"
exec busybox init
EOF
            ;;
        cloudinit)
            cat <<'EOF'
# The cloud-init seed (NoCloud: an ISO9660 or FAT file system labelled cidata) may be a virtio
# disk (virtio_blk is in the initramfs), a CD-ROM on the i440fx machine's IDE controller
# (ata_piix + sr_mod) or one on virtio-scsi. isofs: mount(8) would load it on demand anyway.
# (This kernel has no AHCI driver: a SATA CD-ROM, e.g. on q35, is never seen.)
modprobe -q -a virtio_scsi ata_piix sr_mod isofs || say "modprobe of the seed drivers failed"

# DHCP in the background: with libvirt's dnsmasq the first offer takes seconds, cloud-init
# needs no network for NoCloud and its network configuration is disabled (cloud.cfg.d).
start_network &

# Optional: ACPI power button -> SIGUSR2 to PID 1 (busybox init powers off).
busybox acpid -c /etc/acpi >/dev/null 2>&1 || true

# cloud-init without systemd: one 'cloud-init init' (the network stage). It finds the seed
# itself (NoCloud by label), then runs cloud_init_modules (90_hyperjob.cfg trims them to
# set_hostname, update_hostname, users-groups and ssh: the ssh module writes the host keys of
# ssh_keys, users-groups creates the users and their authorized_keys). The local stage, the
# config and the final stages are not run: see docs/testing.md.
say "cloud-init init"
if cloud-init init >/dev/console 2>&1; then
    say "cloud-init init done"
else
    say "cloud-init init failed (exit $?); see /var/log/cloud-init.log"
fi

say "starting busybox init (sshd from /etc/inittab)"
exec busybox init
EOF
            ;;
        *) die "guest_system: unknown variant $variant" ;;
        esac
    } >"$root/etc/hyperjob/init"
    chmod 0755 "$root/etc/hyperjob/init"
    rm -f "$root/usr/sbin/init"
    ln -s /etc/hyperjob/init "$root/usr/sbin/init"

    install -d -m 0755 "$root/etc/acpi/PWRF"
    printf '#!/bin/sh\nexec kill -USR2 1\n' >"$root/etc/acpi/PWRF/00000080"
    chmod 0755 "$root/etc/acpi/PWRF/00000080"

    cat >"$root/etc/hyperjob/udhcpc.script" <<'EOF'
#!/bin/sh
# busybox udhcpc event script: applies the lease (address, default route, DNS) to $interface.
case "$1" in
deconfig)
    busybox ip -4 addr flush dev "$interface"
    busybox ip link set "$interface" up
    ;;
bound|renew)
    cidr="$ip/${mask:-24}"
    if ! busybox ip -4 addr show dev "$interface" | grep -q "inet $cidr "; then
        busybox ip -4 addr flush dev "$interface"
        busybox ip -4 addr add "$cidr" broadcast "${broadcast:-+}" dev "$interface"
    fi
    for r in $router; do
        busybox ip -4 route replace default via "$r" dev "$interface"
        break
    done
    if [ -n "$dns" ]; then
        : >/etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
        for s in $dns; do echo "nameserver $s" >>/etc/resolv.conf; done
    fi
    echo "udhcpc: [$(cut -d' ' -f1 /proc/uptime)] $1: $interface $cidr router ${router:-none}" >/dev/console
    ;;
esac
exit 0
EOF
    chmod 0755 "$root/etc/hyperjob/udhcpc.script"

    echo "$hostname" >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
        "$hostname" >"$root/etc/hosts"
    : >"$root/etc/resolv.conf"
}

guest_trim() {
    local root=$1
    rm -rf "$root/var/cache/apt/"*.bin "$root/var/lib/apt/lists/"* "$root/var/log/"*.log \
        "$root/var/cache/debconf/"*-old "$root/var/lib/dpkg/"*-old
}

# base.qcow2. Runs with the chroot's /proc, /sys and /dev mounted, after all packages are
# installed. $2 is the build's work directory: the client public key is read from it and the
# host public key is written to it.
customize_hook() {
    local root=$1 work=$2 hostname=$3
    local home=/home/$GUEST_USER

    guest_system "$root" dropbear "$hostname"
    cat >"$root/etc/inittab" <<EOF
# busybox init, hyperjob test guest. Setup happens in /etc/hyperjob/init before this.
::respawn:/usr/sbin/dropbear -F -E -s -p 22 -r $HOST_KEY
::ctrlaltdel:/bin/busybox poweroff
::shutdown:/bin/sync
EOF

    # --- SSH host key (baked: every guest from this image presents exactly this key) --------
    install -d -m 0755 "$root/etc/dropbear"
    rm -f "$root$HOST_KEY"
    if [ -s "$work/ssh_host_ed25519_key" ]; then
        install -m 0600 "$work/ssh_host_ed25519_key" "$root$HOST_KEY"
    else
        chroot "$root" dropbearkey -t ed25519 -f "$HOST_KEY" >/dev/null 2>&1 ||
            die "dropbearkey failed in the guest root"
        install -m 0600 "$root$HOST_KEY" "$work/ssh_host_ed25519_key"
    fi
    chmod 0600 "$root$HOST_KEY"
    chroot "$root" dropbearkey -y -f "$HOST_KEY" |
        awk '$1 ~ /^ssh-/ { print "* " $1 " " $2 }' >"$work/known_hosts"
    [ -s "$work/known_hosts" ] || die "could not read the guest host public key"

    # --- CI user -----------------------------------------------------------------------------
    chroot "$root" useradd --create-home --home-dir "$home" --shell /bin/bash --user-group \
        "$GUEST_USER"
    # '*': no password can match, but the account is not "locked" ('!'), which dropbear rejects.
    chroot "$root" usermod --password '*' "$GUEST_USER"
    install -d -m 0700 "$root$home/.ssh"
    install -m 0600 "$work/id_ed25519.pub" "$root$home/.ssh/authorized_keys"
    install -d -m 0755 "$root$home/builds"
    chroot "$root" chown -R "$GUEST_USER:$GUEST_USER" "$home"
    chmod 0755 "$root$home"

    guest_trim "$root"
}

# cloudinit.qcow2: Debian's cloud-init and OpenSSH, and no key and no CI user at all. Both come
# from the NoCloud seed at boot: the ssh module writes the host key(s) of user-data's ssh_keys,
# users-groups creates the users of users: with their ssh_authorized_keys.
customize_hook_cloudinit() {
    local root=$1 hostname=$2

    guest_system "$root" cloudinit "$hostname"
    cat >"$root/etc/inittab" <<'EOF'
# busybox init, hyperjob cloud-init test guest. Setup (and cloud-init) happens in
# /etc/hyperjob/init before this.
::respawn:/etc/hyperjob/sshd
::ctrlaltdel:/bin/busybox poweroff
::shutdown:/bin/sync
EOF
    cat >"$root/etc/hyperjob/sshd" <<'EOF'
#!/bin/sh
# Run (and respawned) by busybox init. Every host key comes from the cloud-init seed: without
# one (no seed, or no ssh_keys in it) there is nothing to serve, so say so and retry slowly
# rather than let busybox init respawn a failing sshd in a tight loop.
set -- /etc/ssh/ssh_host_*_key
if [ ! -e "$1" ]; then
    echo "hyperjob-sshd: no /etc/ssh/ssh_host_*_key (no cloud-init seed with ssh_keys?); retrying in 10 s" >/dev/console
    exec sleep 10
fi
mkdir -p -m 0755 /run/sshd
exec /usr/sbin/sshd -D -e
EOF
    chmod 0755 "$root/etc/hyperjob/sshd"

    # --- OpenSSH: keys only, and no host key of its own -------------------------------------
    # Debian's sshd_config includes sshd_config.d/*.conf first (first value wins). UsePAM stays
    # yes (Debian's default, as in stock cloud images): cloud-init locks the password of the
    # users it creates ('!', lock_passwd defaults to true) and sshd without PAM refuses any
    # login, keys included, to a locked account.
    cat >"$root/etc/ssh/sshd_config.d/hyperjob.conf" <<'EOF'
# hyperjob cloud-init test guest: public keys only.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
EOF
    # openssh-server's postinst generated host keys: they must not survive into the image.
    rm -f "$root/etc/ssh/ssh_host_"*

    # --- cloud-init --------------------------------------------------------------------------
    cat >"$root/etc/cloud/cloud.cfg.d/90_hyperjob.cfg" <<'EOF'
# hyperjob cloud-init test guest. No systemd: /etc/hyperjob/init runs 'cloud-init init' itself.
# Only the NoCloud seed (found by its file system label, cidata): never probe the network for
# other data sources. None: the fallback when there is no seed.
datasource_list: [ NoCloud, None ]
# /etc/hyperjob/init configures eth0 with busybox udhcpc.
network: {config: disabled}
# Keep what the test guest needs, so the one stage that runs stays short under TCG.
cloud_init_modules:
 - set_hostname
 - update_hostname
 - users-groups
 - ssh
EOF
    rm -rf "$root/var/lib/cloud/"* "$root/var/log/cloud-init"*
    [ -z "$(find "$root/home" -mindepth 1 -maxdepth 1)" ] || die "the cloud-init guest has a /home"

    guest_trim "$root"
}

# >>> stock.qcow2
# stock.qcow2: the guest as a stock cloud image is, booted by the same vmlinuz/initrd.img.
# systemd is PID 1 (systemd-sysv's /sbin/init: the initramfs runs it, nothing on the command
# line); udev loads the drivers; systemd-networkd does DHCP with the configuration cloud-init
# renders (its fallback: DHCP on the first NIC); Debian's ssh.service starts sshd (Debian has no
# sshd-keygen.service: its host keys come from openssh-server's postinst, replaced here by the
# three baked keys, or from cloud-init's ssh module, which cloud-init.service runs Before=
# sshd.service, the alias of ssh.service); cloud-init's four units run as Debian ships them.
# $2 is stock.qcow2's work directory: its out/ holds the host keys, modules/ the kernel modules
# of base.qcow2 (matching vmlinuz); the client key is IDENTITY_FILE's public half ($3).
customize_hook_stock() {
    local root=$1 work=$2 client_pub=$3 hostname=$4
    local home=/home/$GUEST_USER unit type

    echo "$hostname" >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
        "$hostname" >"$root/etc/hosts"
    # No locales package: C.UTF-8 (else cloud-init's locale module runs update-locale for en_US).
    echo 'LANG=C.UTF-8' >"$root/etc/default/locale"
    # Empty, as in cloud images: every VM makes its own at first boot.
    : >"$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id"
    printf 'LABEL=hyperjob-root / ext4 rw,errors=remount-ro 0 1\n' >"$root/etc/fstab"

    # --- kernel modules of vmlinuz (no kernel package: the image boots base.qcow2's kernel) ---
    install -d -m 0755 "$root/usr/lib/modules"
    cp -a -- "$work/modules/." "$root/usr/lib/modules/"

    # --- systemd ------------------------------------------------------------------------------
    chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1 ||
        die "systemctl enable systemd-networkd failed in the stock guest root"
    # Timers and jobs a stock image has but that only cost CPU under TCG and have nothing to do
    # with SSH or cloud-init. Masked, so they never start.
    for unit in apt-daily.timer apt-daily-upgrade.timer apt-daily.service \
        apt-daily-upgrade.service dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service \
        fstrim.timer; do
        ln -sfn /dev/null "$root/etc/systemd/system/$unit"
    done
    for unit in multi-user.target.wants/ssh.service sshd.service \
        cloud-init.target.wants/cloud-init-local.service \
        cloud-init.target.wants/cloud-init.service \
        cloud-init.target.wants/cloud-config.service \
        cloud-init.target.wants/cloud-final.service \
        multi-user.target.wants/systemd-networkd.service; do
        [ -L "$root/etc/systemd/system/$unit" ] || die "stock guest: $unit is not enabled"
    done

    # --- SSH host keys: the three baked ones (stock_known_hosts pins them) --------------------
    rm -f "$root/etc/ssh/ssh_host_"*
    for type in $STOCK_KEY_TYPES; do
        install -m 0600 "$work/out/stock_ssh_host_${type}_key" \
            "$root/etc/ssh/ssh_host_${type}_key"
        install -m 0644 "$work/stock_ssh_host_${type}_key.pub" \
            "$root/etc/ssh/ssh_host_${type}_key.pub"
    done

    # --- cloud-init ---------------------------------------------------------------------------
    cat >"$root/etc/cloud/cloud.cfg.d/99_hyperjob.cfg" <<'CFG'
# hyperjob stock test guest: Debian's cloud-init and its four systemd units as shipped, except:
# Only a NoCloud seed (a disk labelled cidata: hyperjob attaches one with guest_keys =
# "per-job"), else None: never probe the network for other data sources.
datasource_list: [ NoCloud, None ]
# The baked host keys are pinned (stock_known_hosts). Without a seed every boot is a new
# instance (datasource None): cloud-init must neither delete them (ssh_deletekeys defaults to
# true) nor add other types (the default ssh_genkeytypes includes dsa). A seed's user-data
# overrides both: hyperjob's per-job seed deletes them and installs the job's key.
ssh_deletekeys: false
ssh_genkeytypes: [ed25519, ecdsa, rsa]
CFG
    rm -rf "$root/var/lib/cloud/"* "$root/var/log/cloud-init"*

    # --- CI user (pinned keys: IDENTITY_FILE logs in) ---------------------------------------
    chroot "$root" useradd --create-home --home-dir "$home" --shell /bin/bash --user-group \
        "$GUEST_USER"
    chroot "$root" usermod --password '*' "$GUEST_USER"
    install -d -m 0700 "$root$home/.ssh"
    install -m 0600 "$client_pub" "$root$home/.ssh/authorized_keys"
    install -d -m 0755 "$root$home/builds"
    chroot "$root" chown -R "$GUEST_USER:$GUEST_USER" "$home"
    chmod 0755 "$root$home"

    guest_trim "$root"
}
# <<< stock.qcow2
# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------

WORK=
CHILD=
OLD=

# Runs a long command in the background so a signal reaches our trap at once; the trap
# stops it (by pid) before cleaning up.
run_child() {
    local rc=0
    "$@" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=
    return "$rc"
}

on_signal() {
    trap - INT TERM HUP
    if [ -n "$CHILD" ]; then
        kill -TERM "$CHILD" 2>/dev/null || true
        wait "$CHILD" 2>/dev/null || true
    fi
    exit "$1"
}

cleanup() {
    local m
    [ -n "$WORK" ] || return 0
    # mmdebstrap mounts /proc, /sys, /dev in the chroot: never let rm walk into those.
    awk -v w="$WORK" 'index($2, w "/") == 1 { print $2 }' /proc/self/mounts | sort -r |
        while read -r m; do
            umount -l "$m" 2>/dev/null || log "warning: could not unmount $m"
        done
    rm -rf --one-file-system -- "$WORK"
    [ -z "$OLD" ] || rm -rf --one-file-system -- "$OLD"
}

image_complete() {
    local dir=$1 f
    for f in $REQUIRED_FILES; do
        [ -s "$dir/$f" ] || return 1
    done
    [ "$(cat "$dir/stamp")" = "$STAMP" ]
}

check_searchable() {
    # libvirt runs QEMU as libvirt-qemu: every directory above the image must be o+x.
    local d=$1 mode
    while [ "$d" != / ]; do
        mode=$(stat -c %a "$d")
        if (( (8#$mode & 1) == 0 )); then
            die "$d (mode $mode) is not searchable by others; libvirt-qemu could not reach the image (choose another OUT_DIR)"
        fi
        d=$(dirname "$d")
    done
}

# bootable.qcow2, for the bootloader path (no <kernel>: SeaBIOS boots the disk). Assembled from
# plain files, without mounting anything and without loop devices:
#   MBR     SYSLINUX's mbr.bin (boots the active partition), DOS partition table
#   vda1    FAT16, active, type e: ldlinux.sys/ldlinux.c32 (syslinux's mtools installer),
#           syslinux.cfg, vmlinuz, initrd.img
#   vda2    type 83: the very ext4 image that base.qcow2 is made from
# Everything before vda2 is built as head.raw; qemu-img convert then concatenates head.raw and
# the root file system image into one qcow2 (no 2 GiB intermediate disk, holes stay holes).
build_bootable() {
    local work=$1 image=$2 root_raw=$3
    local fat=$work/boot.fat head=$work/head.raw
    local boot_start=2048 boot_sectors=$(( BOOT_PART_MB * 2048 ))
    local root_start=$(( 2048 + BOOT_PART_MB * 2048 )) root_bytes root_sectors
    root_bytes=$(stat -c %s "$root_raw")
    (( root_bytes % 512 == 0 )) || die "$root_raw is not a whole number of sectors"
    root_sectors=$(( root_bytes / 512 ))

    # -h: the BPB's "hidden sectors" = the partition's start LBA, as mkfs.fat would write it on
    # a real partition. --mbr=n: no fake partition table inside the volume boot record.
    mkfs.fat -C -F 16 -n HJBOOT -i 6879706a -h "$boot_start" --mbr=n "$fat" \
        $(( BOOT_PART_MB * 1024 )) >/dev/null || die "mkfs.fat failed"
    # SERIAL first, so SYSLINUX talks on ttyS0 too; PROMPT 0 + TIMEOUT: boot at once.
    cat >"$work/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 1
LABEL linux
    LINUX /vmlinuz
    INITRD /initrd.img
    APPEND $BOOT_CMDLINE
EOF
    MTOOLS_SKIP_CHECK=1 mcopy -i "$fat" -- "$image/vmlinuz" "$image/initrd.img" \
        "$work/syslinux.cfg" ::/ || die "mcopy to the boot file system failed"
    syslinux --install "$fat" || die "syslinux --install failed"
    local listing
    listing=$(MTOOLS_SKIP_CHECK=1 mdir -a -b -i "$fat" ::/) ||
        die "mdir of the boot file system failed"
    [[ $listing == *"::/ldlinux.sys"* && $listing == *"::/ldlinux.c32"* ]] ||
        die "syslinux left no ldlinux.sys/ldlinux.c32 on the boot file system"

    # Partition the full (sparse, empty) disk size so sfdisk checks vda2 fits, then keep only
    # the part before vda2.
    truncate -s $(( (root_start + root_sectors) * 512 )) "$head"
    sfdisk --quiet --no-reread --no-tell-kernel "$head" >/dev/null <<EOF || die "sfdisk failed"
label: dos
label-id: 0x6879706a
unit: sectors
start=$boot_start, size=$boot_sectors, type=e, bootable
start=$root_start, size=$root_sectors, type=83
EOF
    dd if="$fat" of="$head" bs=1M seek=$(( boot_start * 512 )) oflag=seek_bytes conv=notrunc \
        status=none || die "dd of the boot partition failed"
    # Boot code only: bytes 440.. (disk signature, partition table, 55aa) stay sfdisk's.
    dd if="$SYSLINUX_MBR" of="$head" bs=440 count=1 conv=notrunc status=none ||
        die "dd of $SYSLINUX_MBR failed"
    truncate -s $(( root_start * 512 )) "$head"
    qemu-img convert -f raw -O qcow2 "$head" "$root_raw" "$image/bootable.qcow2" ||
        die "qemu-img convert of the bootable disk failed"
    local size
    size=$(qemu-img info "$image/bootable.qcow2" |
        sed -n 's/^virtual size: .*(\([0-9]*\) bytes)$/\1/p')
    [ "$size" = $(( (root_start + root_sectors) * 512 )) ] ||
        die "bootable.qcow2 is ${size:-?} bytes, not head + root file system"
    rm -f -- "$head" "$fat"
}

# make_tree ROOT LOG PACKAGES HOOK-OPTIONS...: one mmdebstrap run, a Debian tree (minbase, no
# docs, man pages, locales). The .debs it uses are hard-linked into $WORK/debs and from there
# into the next run's apt cache, which then downloads only what it adds.
make_tree() {
    local root=$1 logfile=$2 packages=$3 debs=$WORK/debs
    shift 3
    mkdir -p "$debs"
    # shellcheck disable=SC2016  # $1 is expanded by mmdebstrap's hook shell, on purpose
    run_child mmdebstrap --mode=root --variant=minbase --format=directory \
        --include="$packages" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --skip=essential/unlink \
        --setup-hook="mkdir -p \"\$1/var/cache/apt/archives\" && cp -al \"$debs/.\" \"\$1/var/cache/apt/archives/\"" \
        "$@" \
        --customize-hook="cp -al -n \"\$1\"/var/cache/apt/archives/*.deb \"$debs/\"" \
        "$SUITE" "$root" "$MIRROR" >"$logfile" 2>&1 ||
        { tail -n 30 "$logfile" >&2; die "mmdebstrap failed (log above)"; }
}

# make_ext4 ROOT RAW: an ext4 image of the tree ROOT with FREE_MB MiB to spare.
make_ext4() {
    local root=$1 raw=$2 used_mb size_mb
    used_mb=$(du -sxm "$root" | cut -f1)
    size_mb=$(( used_mb + used_mb / 5 + FREE_MB ))
    log "mkfs.ext4 $(basename "$raw") (${used_mb} MiB used, ${size_mb} MiB file system) ..."
    mkfs.ext4 -q -F -L hyperjob-root -m 1 -d "$root" "$raw" "${size_mb}M" >/dev/null ||
        die "mkfs.ext4 -d failed"
}

build() {
    local out=$1 work=$2
    local root=$work/rootfs ci_root=$work/rootfs-cloudinit image=$work/out
    local packages=bash,git,ca-certificates,busybox,dropbear-bin,openssh-sftp-server,kmod
    packages+=,util-linux,procps,passwd,linux-image-cloud-amd64,initramfs-tools
    # No kernel package: the cloud-init guest boots the same vmlinuz/initrd.img and gets a copy
    # of the matching /lib/modules from the first tree.
    local ci_packages=bash,git,ca-certificates,busybox,openssh-server,openssh-sftp-server,kmod
    ci_packages+=,util-linux,procps,passwd,cloud-init
    if [ -n "${HYPERJOB_IMAGE_EXTRA_PACKAGES:-}" ]; then
        packages+=",$HYPERJOB_IMAGE_EXTRA_PACKAGES"
        ci_packages+=",$HYPERJOB_IMAGE_EXTRA_PACKAGES"
    fi

    mkdir -m 0755 "$image"
    # Keep the keys of the previous image (if any) so a rebuild does not invalidate
    # known_hosts / the identity anyone has copied; HYPERJOB_IMAGE_NEW_KEYS=1 forces new ones.
    if [ "${HYPERJOB_IMAGE_NEW_KEYS:-0}" != 1 ] && [ -s "$out/id_ed25519" ] &&
        [ -s "$out/id_ed25519.pub" ] && [ -s "$out/ssh_host_ed25519_key" ]; then
        log "reusing the SSH keys of $out"
        cp -- "$out/id_ed25519" "$out/id_ed25519.pub" "$out/ssh_host_ed25519_key" "$image/"
    else
        ssh-keygen -q -t ed25519 -N '' -C hyperjob-test -f "$image/id_ed25519"
    fi

    log "mmdebstrap $SUITE ($MIRROR) ..."
    make_tree "$root" "$work/mmdebstrap.log" "$packages" \
        --essential-hook="\"$SELF\" __essential-hook \"\$1\"" \
        --customize-hook="\"$SELF\" __customize-hook \"\$1\" \"$image\" \"$GUEST_HOSTNAME\""

    local kernel initrd kver
    kernel=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n 1)
    [ -n "$kernel" ] || die "no kernel in the guest's /boot"
    kver=${kernel##*/vmlinuz-}
    initrd=$root/boot/initrd.img-$kver
    [ -f "$initrd" ] || die "no initrd matching $kernel in the guest's /boot"
    [ -f "$root/lib/modules/$kver/modules.dep" ] || die "no /lib/modules/$kver in the guest"
    install -m 0644 "$kernel" "$image/vmlinuz"
    install -m 0644 "$initrd" "$image/initrd.img"
    # The guest never boots its own /boot (direct kernel boot, or SYSLINUX from the FAT
    # partition of bootable.qcow2): don't ship the copies twice.
    rm -f -- "$kernel" "$initrd" "$root/vmlinuz" "$root/vmlinuz.old" "$root/initrd.img" \
        "$root/initrd.img.old"

    make_ext4 "$root" "$work/root.raw"
    qemu-img convert -f raw -O qcow2 "$work/root.raw" "$image/base.qcow2" ||
        die "qemu-img convert failed"
    log "bootable.qcow2 (MBR + SYSLINUX, FAT boot partition, root on partition 2) ..."
    build_bootable "$work" "$image" "$work/root.raw"
    rm -f -- "$work/root.raw"

    log "mmdebstrap $SUITE ($MIRROR) with cloud-init and OpenSSH ..."
    make_tree "$ci_root" "$work/mmdebstrap-cloudinit.log" "$ci_packages" \
        --customize-hook="\"$SELF\" __customize-hook-cloudinit \"\$1\" \"$GUEST_HOSTNAME\""
    mkdir -p "$ci_root/lib/modules"
    cp -a -- "$root/lib/modules/$kver" "$ci_root/lib/modules/"
    make_ext4 "$ci_root" "$work/cloudinit.raw"
    qemu-img convert -f raw -O qcow2 "$work/cloudinit.raw" "$image/cloudinit.qcow2" ||
        die "qemu-img convert of the cloud-init image failed"
    rm -f -- "$work/cloudinit.raw"

    chmod 0644 "$image/base.qcow2" "$image/bootable.qcow2" "$image/cloudinit.qcow2" \
        "$image/id_ed25519.pub" "$image/known_hosts"
    chmod 0600 "$image/id_ed25519" "$image/ssh_host_ed25519_key"

    cat >"$image/image.env" <<EOF
# hyperjob test guest image, built by scripts/build-guest-image.sh ($(date -u +%Y-%m-%dT%H:%M:%SZ))
KERNEL=$out/vmlinuz
INITRD=$out/initrd.img
CMDLINE='$CMDLINE'
BASE_IMAGE=$out/base.qcow2
BOOTABLE_IMAGE=$out/bootable.qcow2
IDENTITY_FILE=$out/id_ed25519
KNOWN_HOSTS=$out/known_hosts
GUEST_USER=$GUEST_USER
# cloud-init guest: same KERNEL and INITRD; no keys and no user until a NoCloud seed provides
# them (docs/testing.md). IDENTITY_FILE and KNOWN_HOSTS do not apply to it.
CLOUDINIT_IMAGE=$out/cloudinit.qcow2
CLOUDINIT_CMDLINE='$CLOUDINIT_CMDLINE'
CLOUDINIT_SEED_LABEL=cidata
EOF
    chmod 0644 "$image/image.env"
    printf '%s\n' "$STAMP" >"$image/stamp"
    chmod 0644 "$image/stamp"
}

# >>> stock.qcow2
# The images above are stamped with a hash of this script without its stock.qcow2 blocks.
base_script_sha256() {
    sed '/^[[:space:]]*# >>> stock\.qcow2/,/^[[:space:]]*# <<< stock\.qcow2/d' "$SELF" |
        sha256sum | cut -d' ' -f1
}

# The stamp stock.qcow2 must carry: the whole script, and the other images' stamp (which names
# the build parameters; the kernel modules come from base.qcow2).
stock_stamp() {
    printf 'hyperjob-stock-image script=%s base=%s\n' "$(sha256sum "$SELF" | cut -d' ' -f1)" \
        "$(sha256sum "$1/stamp" | cut -d' ' -f1)"
}

stock_complete() {
    local dir=$1 f
    for f in $STOCK_REQUIRED_FILES; do
        [ -s "$dir/$f" ] || return 1
    done
    grep -q '^STOCK_IMAGE=' "$dir/image.env" || return 1
    [ "$(cat "$dir/stock.stamp")" = "$(stock_stamp "$dir")" ]
}

# stock_modules OUT WORK: /usr/lib/modules/<version> of base.qcow2 into WORK/modules, read with
# debugfs from a raw copy (no mount, no loop device).
stock_modules() {
    local out=$1 work=$2 raw=$2/base.raw dir listing kver
    qemu-img convert -f qcow2 -O raw "$out/base.qcow2" "$raw" ||
        die "qemu-img convert of base.qcow2 failed"
    for dir in /usr/lib/modules /lib/modules; do
        listing=$(debugfs -R "ls -p $dir" "$raw" 2>/dev/null) || continue
        kver=$(printf '%s\n' "$listing" |
            awk -F/ '$6 != "" && $6 != "." && $6 != ".." { print $6 }')
        [ -n "$kver" ] && break
    done
    if [ -z "$kver" ] || [ "$(printf '%s\n' "$kver" | wc -l)" != 1 ]; then
        die "base.qcow2 has not exactly one kernel in /usr/lib/modules: ${kver:-none}"
    fi
    mkdir -p "$work/modules"
    debugfs -R "rdump $dir/$kver $work/modules" "$raw" >/dev/null 2>&1 ||
        die "debugfs could not copy $dir/$kver out of base.qcow2"
    [ -s "$work/modules/$kver/modules.dep" ] || die "no modules.dep in base.qcow2's $dir/$kver"
    rm -f -- "$raw"
}

# Builds stock.qcow2 next to the complete images in OUT (the caller holds the lock). Only its
# own files are replaced, one rename each, then image.env's STOCK_ lines, then stock.stamp.
build_stock() {
    local out=$1 start work image root type f
    local packages=systemd,systemd-sysv,udev,dbus,openssh-server,openssh-sftp-server,cloud-init
    packages+=,systemd-resolved,bash,git,ca-certificates,kmod,util-linux,procps,passwd,iproute2
    [ -z "${HYPERJOB_IMAGE_EXTRA_PACKAGES:-}" ] || packages+=",$HYPERJOB_IMAGE_EXTRA_PACKAGES"
    start=$(date +%s)
    trap cleanup EXIT
    trap 'on_signal 130' INT
    trap 'on_signal 143' TERM
    trap 'on_signal 129' HUP
    WORK=$(mktemp -d "$(dirname "$out")/.$(basename "$out").stock.XXXXXX")
    chmod 0755 "$WORK"
    work=$WORK image=$WORK/out root=$WORK/rootfs-stock
    mkdir -m 0755 "$image"

    if [ "${HYPERJOB_IMAGE_NEW_KEYS:-0}" != 1 ] && [ -s "$out/stock_ssh_host_rsa_key" ]; then
        log "reusing the stock guest's host keys of $out"
    fi
    for type in $STOCK_KEY_TYPES; do
        f=stock_ssh_host_${type}_key
        if [ "${HYPERJOB_IMAGE_NEW_KEYS:-0}" != 1 ] && [ -s "$out/$f" ]; then
            install -m 0600 "$out/$f" "$image/$f"
        else
            ssh-keygen -q -t "$type" -N '' -C hyperjob-stock-guest -f "$image/$f"
            rm -f "$image/$f.pub"
        fi
        ssh-keygen -y -f "$image/$f" >"$work/$f.pub" || die "ssh-keygen -y $f failed"
        awk '{ print "* " $1 " " $2 }' "$work/$f.pub" >>"$image/stock_known_hosts"
    done
    [ "$(wc -l <"$image/stock_known_hosts")" = 3 ] || die "stock_known_hosts is not 3 keys"

    log "stock.qcow2: kernel modules of base.qcow2 ..."
    stock_modules "$out" "$work"
    log "mmdebstrap $SUITE ($MIRROR) with systemd, OpenSSH and cloud-init ..."
    make_tree "$root" "$work/mmdebstrap-stock.log" "$packages" \
        --customize-hook="\"$SELF\" __customize-hook-stock \"\$1\" \"$work\" \"$out/id_ed25519.pub\" \"$GUEST_HOSTNAME\""
    make_ext4 "$root" "$work/stock.raw"
    qemu-img convert -f raw -O qcow2 "$work/stock.raw" "$image/stock.qcow2" ||
        die "qemu-img convert of the stock image failed"
    rm -f -- "$work/stock.raw"
    chmod 0644 "$image/stock.qcow2" "$image/stock_known_hosts"

    rm -f -- "$out/stock.stamp"
    for f in stock_ssh_host_ed25519_key stock_ssh_host_ecdsa_key stock_ssh_host_rsa_key \
        stock_known_hosts stock.qcow2; do
        mv -f -- "$image/$f" "$out/$f"
    done
    {
        grep -v -e '^STOCK_' -e '^# stock guest' "$out/image.env"
        cat <<ENV
# stock guest (systemd, OpenSSH, cloud-init; docs/testing.md): same KERNEL, INITRD and
# IDENTITY_FILE; its own host keys, listed in STOCK_KNOWN_HOSTS.
STOCK_IMAGE=$out/stock.qcow2
STOCK_CMDLINE='$STOCK_CMDLINE'
STOCK_KNOWN_HOSTS=$out/stock_known_hosts
ENV
    } >"$image/image.env"
    chmod 0644 "$image/image.env"
    mv -f -- "$image/image.env" "$out/image.env"
    stock_stamp "$out" >"$image/stock.stamp"
    chmod 0644 "$image/stock.stamp"
    mv -f -- "$image/stock.stamp" "$out/stock.stamp"
    cleanup
    WORK=

    log "built stock.qcow2 in $(( $(date +%s) - start )) s: $(du -m --apparent-size "$out/stock.qcow2" | cut -f1) MiB file"
}

# stock.qcow2 next to complete images in OUT, unless it is up to date. Takes the build lock.
build_stock_unless_complete() {
    local out=$1 parent
    if stock_complete "$out"; then
        log "up to date: $out/stock.qcow2"
        return 0
    fi
    parent=$(dirname "$out")
    check_searchable "$parent"
    exec 9<"$parent"
    flock 9
    if stock_complete "$out"; then
        log "up to date: $out/stock.qcow2 (built concurrently)"
        return 0
    fi
    image_complete "$out" || die "$out changed while waiting for the build lock"
    build_stock "$out"
}
# <<< stock.qcow2
main() {
    # >>> stock.qcow2
    # The help without the marker lines (the case's -h entry, kept as it was, would print them).
    if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
        sed -n '2,/^set -euo/p' "$SELF" | sed '/^# [<>]\{3\} stock\.qcow2/d; $d; s/^# \{0,1\}//'
        return
    fi
    # <<< stock.qcow2
    case "${1:-}" in
    __essential-hook) essential_hook "$2"; return ;;
    __customize-hook) customize_hook "$2" "$3" "$4"; return ;;
    __customize-hook-cloudinit) customize_hook_cloudinit "$2" "$3"; return ;;
    # >>> stock.qcow2
    __customize-hook-stock) customize_hook_stock "$2" "$3" "$4" "$5"; return ;;
    # <<< stock.qcow2
    -h|--help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; return ;;
    esac
    [ $# -le 1 ] || die "usage: $PROG [OUT_DIR]"
    [ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap --mode=root, chroot)"

    local out=${1:-${HYPERJOB_IMAGE_DIR:-/var/lib/hyperjob-test/image}}
    SUITE=${HYPERJOB_IMAGE_SUITE:-bookworm}
    MIRROR=${HYPERJOB_IMAGE_MIRROR:-http://deb.debian.org/debian}
    FREE_MB=${HYPERJOB_IMAGE_FREE_MB:-1536}
    GUEST_HOSTNAME=${HYPERJOB_GUEST_HOSTNAME:-hyperjob-guest}
    [[ $FREE_MB =~ ^[0-9]+$ ]] || die "HYPERJOB_IMAGE_FREE_MB must be a number of MiB"
    local tool
    for tool in mmdebstrap mkfs.ext4 qemu-img ssh-keygen flock mkfs.fat mcopy mdir syslinux \
        sfdisk truncate; do
        command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
    done
    [ -s "$SYSLINUX_MBR" ] || die "$SYSLINUX_MBR not found (run scripts/install-deps.sh)"
    # >>> stock.qcow2
    command -v debugfs >/dev/null || die "debugfs not found (run scripts/install-deps.sh)"
    # <<< stock.qcow2

    out=$(realpath -m -- "$out")
    STAMP="hyperjob-guest-image script=$(sha256sum "$SELF" | cut -d' ' -f1) suite=$SUITE mirror=$MIRROR free_mb=$FREE_MB hostname=$GUEST_HOSTNAME extra=${HYPERJOB_IMAGE_EXTRA_PACKAGES:-}"
    # >>> stock.qcow2
    STAMP="hyperjob-guest-image script=$(base_script_sha256) ${STAMP#hyperjob-guest-image script=* }"
    # <<< stock.qcow2

    if image_complete "$out"; then
        log "up to date: $out"
        # >>> stock.qcow2
        build_stock_unless_complete "$out"
        # <<< stock.qcow2
        return 0
    fi

    local parent
    parent=$(dirname "$out")
    (umask 022 && mkdir -p "$parent")
    check_searchable "$parent"

    # One build at a time per parent directory; re-check once we hold the lock.
    exec 9<"$parent"
    flock 9
    if image_complete "$out"; then
        log "up to date: $out (built concurrently)"
        # >>> stock.qcow2
        build_stock_unless_complete "$out"
        # <<< stock.qcow2
        return 0
    fi

    local start
    start=$(date +%s)
    trap cleanup EXIT
    trap 'on_signal 130' INT
    trap 'on_signal 143' TERM
    trap 'on_signal 129' HUP
    WORK=$(mktemp -d "$parent/.$(basename "$out").build.XXXXXX")
    chmod 0755 "$WORK"

    build "$out" "$WORK"
    # >>> stock.qcow2
    # The swap below removes the old directory: keep the stock guest's host keys for its build.
    local key
    if [ "${HYPERJOB_IMAGE_NEW_KEYS:-0}" != 1 ]; then
        for key in "$out"/stock_ssh_host_*_key; do
            if [ -s "$key" ]; then
                cp -p -- "$key" "$WORK/out/"
            fi
        done
    fi
    # <<< stock.qcow2

    # Swap in: the stamp is inside, so a half-moved or missing directory never looks complete.
    if [ -e "$out" ]; then
        OLD=$out.old.$$
        mv -T -- "$out" "$OLD"
    fi
    mv -T -- "$WORK/out" "$out"
    cleanup
    WORK=
    OLD=

    log "built $out in $(( $(date +%s) - start )) s; base.qcow2: $(du -m --apparent-size "$out/base.qcow2" | cut -f1) MiB file, $(qemu-img info "$out/base.qcow2" | sed -n 's/^virtual size: \([^(]*\) (.*/\1/p') virtual; bootable.qcow2: $(du -m --apparent-size "$out/bootable.qcow2" | cut -f1) MiB file; cloudinit.qcow2: $(du -m --apparent-size "$out/cloudinit.qcow2" | cut -f1) MiB file"
    # >>> stock.qcow2
    build_stock_unless_complete "$out"
    # <<< stock.qcow2
}

main "$@"
