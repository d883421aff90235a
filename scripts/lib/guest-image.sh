# shellcheck shell=bash
# shellcheck disable=SC2154  # GUEST_USER, CMDLINE, SUITE, MIRROR, GUEST_HOSTNAME, STOCK_STAMP: set by the script that sources this file
# Part of scripts/build-guest-image.sh, which sources it on every start, also when it calls
# itself as an mmdebstrap hook (so the hooks here are found). Here: what goes into the guests
# (the hooks of all four images) and stock.qcow2's build. There: the build machinery (die, log,
# make_tree, make_ext4, begin_work, lock_builds, the traps), the build of the other images and
# the stamps, which hash both files.

readonly HOST_KEY=/etc/dropbear/dropbear_ed25519_host_key

# ---------------------------------------------------------------------------------------------
# Guest files. These run inside mmdebstrap hooks (build-guest-image.sh calls itself).
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

    guest_hostname "$root" "$hostname"
    : >"$root/etc/resolv.conf"
}

guest_hostname() {
    local root=$1 hostname=$2
    echo "$hostname" >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
        "$hostname" >"$root/etc/hosts"
}

# guest_user ROOT PUBKEY: the CI user, PUBKEY its only authorized key, ~/builds.
guest_user() {
    local root=$1 pub=$2 home=/home/$GUEST_USER
    chroot "$root" useradd --create-home --home-dir "$home" --shell /bin/bash --user-group \
        "$GUEST_USER"
    # '*': no password can match, but the account is not "locked" ('!'), which dropbear rejects.
    chroot "$root" usermod --password '*' "$GUEST_USER"
    install -d -m 0700 "$root$home/.ssh"
    install -m 0600 "$pub" "$root$home/.ssh/authorized_keys"
    install -d -m 0755 "$root$home/builds"
    chroot "$root" chown -R "$GUEST_USER:$GUEST_USER" "$home"
    chmod 0755 "$root$home"
}

guest_trim() {
    local root=$1
    rm -rf "$root/var/cache/apt/"*.bin "$root/var/lib/apt/lists/"* "$root/var/log/"*.log \
        "$root/var/cache/debconf/"*-old "$root/var/lib/dpkg/"*-old
}

# /etc/hyperjob/vport-ssh (base.qcow2's inittab respawns it): SSH on the virtio-serial port
# org.hyperjob.ssh, which the QEMU plugin adds with `endpoint = "unix"` and exposes as a UNIX
# socket on the host. Each host connection is bridged (busybox nc) to the guest's own dropbear
# on 127.0.0.1:22, one session each (dropbear's inetd mode needs a socket on stdin). The port
# stays open here between sessions (closing it discards what the next client already sent, and
# tells the host nothing). A bridge starts only while a host client is connected (the port's
# debugfs file says so): dropbear's greeting to nobody would be lost. hyperjob's SSH transport
# sends nothing over a UNIX socket before the server's version line and skips lines before it
# (RFC 4253 allows them), so a client's bytes never reach the bridge of the session before,
# and the notice below reaches a client whose server went away. Without the port: it sleeps.
guest_vport_ssh() {
    local root=$1
    cat >"$root/etc/hyperjob/vport-ssh" <<EOF
#!/bin/busybox sh
# Run (and respawned) by busybox init; see guest_vport_ssh in scripts/lib/guest-image.sh.
name=org.hyperjob.ssh
idle() { exec busybox sleep 2147483647; }
# virtio-console's PCI id is 1af4:1003 (legacy) or 1af4:1043 (modern).
grep -qsx -e 0x1003 -e 0x1043 /sys/bus/pci/devices/*/device || idle
modprobe -q virtio_console || idle
port=
i=0
while [ -z "\$port" ] && [ "\$i" -lt 100 ]; do
    for dir in /sys/class/virtio-ports/*; do
        [ "\$(cat "\$dir/name" 2>/dev/null)" = "\$name" ] && port=\${dir##*/}
    done
    [ -n "\$port" ] || { busybox sleep 0.1; i=\$((i + 1)); }
done
[ -n "\$port" ] || { echo "vport-ssh: no virtio-serial port \$name" >/dev/console; idle; }
grep -q ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs debugfs /sys/kernel/debug || idle
state=/sys/kernel/debug/virtio-ports/\$port
connected() {
    while read -r key value; do
        [ "\$key" = host_connected: ] && [ "\$value" = 1 ] && return 0
    done <"\$state"
    return 1
}
echo "vport-ssh: serving SSH on /dev/\$port (\$name)" >/dev/console
exec 3<>"/dev/\$port"
while :; do
    until connected; do busybox sleep 0.1; done
    busybox nc 127.0.0.1 22 <&3 >&3
    # The session is over. A client still connected is the session's own, whose server went
    # away (nothing else tells it: told, it gives up at once), or the next one, waiting for a
    # greeting (it skips this line): let the first leave before the next bridge starts.
    if connected; then
        echo "hyperjob vport-ssh: session over" >&3
        i=0
        while connected && [ "\$i" -lt 10 ]; do busybox sleep 0.1; i=\$((i + 1)); done
    fi
done
EOF
    chmod 0755 "$root/etc/hyperjob/vport-ssh"
}

# base.qcow2. Runs with the chroot's /proc, /sys and /dev mounted, after all packages are
# installed. $2 is the build's work directory: the client public key is read from it and the
# host public key is written to it.
customize_hook() {
    local root=$1 work=$2 hostname=$3

    guest_system "$root" dropbear "$hostname"
    cat >"$root/etc/inittab" <<EOF
# busybox init, hyperjob test guest. Setup happens in /etc/hyperjob/init before this.
::respawn:/usr/sbin/dropbear -F -E -s -p 22 -r $HOST_KEY
::respawn:/etc/hyperjob/vport-ssh
::ctrlaltdel:/bin/busybox poweroff
::shutdown:/bin/sync
EOF

    guest_vport_ssh "$root"

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

    guest_user "$root" "$work/id_ed25519.pub"
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

# ---------------------------------------------------------------------------------------------
# stock.qcow2: built after the other images, next to them; its own stamp, stock.stamp.
# ---------------------------------------------------------------------------------------------

readonly STOCK_CMDLINE=$CMDLINE
readonly STOCK_KEY_TYPES="ed25519 ecdsa rsa"
readonly STOCK_REQUIRED_FILES="stock.qcow2 stock_known_hosts stock_ssh_host_ed25519_key
    stock_ssh_host_ecdsa_key stock_ssh_host_rsa_key stock.stamp"

# The guest as a stock cloud image is, booted by the same vmlinuz/initrd.img. systemd is PID 1
# (systemd-sysv's /sbin/init: the initramfs runs it, nothing on the command line); udev loads
# the drivers; systemd-networkd does DHCP with the configuration cloud-init renders (its
# fallback: DHCP on the first NIC); Debian's ssh.service starts sshd (Debian has no
# sshd-keygen.service: its host keys come from openssh-server's postinst, replaced here by the
# three baked keys, or from cloud-init's ssh module, which cloud-init.service runs Before=
# sshd.service, the alias of ssh.service); cloud-init's four units run as Debian ships them.
# Runs as mmdebstrap's customize hook. $2 is stock.qcow2's work directory: its out/ holds the
# host keys, modules/ the kernel modules of base.qcow2 (matching vmlinuz); the client key is
# IDENTITY_FILE's public half ($3).
customize_hook_stock() {
    local root=$1 work=$2 client_pub=$3 hostname=$4
    local unit type

    guest_hostname "$root" "$hostname"
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
    guest_user "$root" "$client_pub"
    guest_trim "$root"
}

stock_complete() {
    local dir=$1
    have_files "$dir" "$STOCK_REQUIRED_FILES" || return 1
    grep -q '^STOCK_IMAGE=' "$dir/image.env" || return 1
    [ "$(cat "$dir/stock.stamp")" = "$STOCK_STAMP" ]
}

# stock_carry_keys OUT NEW: the host keys of OUT's stock.qcow2 into NEW, the directory about to
# replace OUT (a rebuild of the other images), so that build_stock reuses them.
stock_carry_keys() {
    local out=$1 new=$2 key
    [ "${HYPERJOB_IMAGE_NEW_KEYS:-0}" != 1 ] || return 0
    for key in "$out"/stock_ssh_host_*_key; do
        if [ -s "$key" ]; then
            cp -p -- "$key" "$new/"
        fi
    done
}

# stock_host_keys OUT IMAGE WORK: the three host keys into IMAGE (OUT's, unless
# HYPERJOB_IMAGE_NEW_KEYS=1 or missing: then new ones), their public halves into WORK, and
# IMAGE/stock_known_hosts.
stock_host_keys() {
    local out=$1 image=$2 work=$3 type f
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
    local out=$1 start work image root f
    local packages=systemd,systemd-sysv,udev,dbus,openssh-server,openssh-sftp-server,cloud-init
    packages+=,systemd-resolved,bash,git,ca-certificates,kmod,util-linux,procps,passwd,iproute2
    [ -z "${HYPERJOB_IMAGE_EXTRA_PACKAGES:-}" ] || packages+=",$HYPERJOB_IMAGE_EXTRA_PACKAGES"
    start=$(date +%s)
    begin_work "$(dirname "$out")/.$(basename "$out").stock.XXXXXX"
    # shellcheck disable=SC2153  # WORK: set by begin_work
    work=$WORK image=$WORK/out root=$WORK/rootfs-stock
    mkdir -m 0755 "$image"

    stock_host_keys "$out" "$image" "$work"
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
    printf '%s\n' "$STOCK_STAMP" >"$image/stock.stamp"
    chmod 0644 "$image/stock.stamp"
    mv -f -- "$image/stock.stamp" "$out/stock.stamp"
    end_work

    log "built stock.qcow2 in $(( $(date +%s) - start )) s: $(du -m --apparent-size "$out/stock.qcow2" | cut -f1) MiB file"
}

# stock.qcow2 next to the complete images in OUT, unless it is up to date. Takes the build lock
# (unless held already).
build_stock_unless_complete() {
    local out=$1
    if stock_complete "$out"; then
        log "up to date: $out/stock.qcow2"
        return 0
    fi
    lock_builds "$(dirname "$out")"
    if stock_complete "$out"; then
        log "up to date: $out/stock.qcow2 (built concurrently)"
        return 0
    fi
    image_complete "$out" || die "$out changed while waiting for the build lock"
    build_stock "$out"
}
