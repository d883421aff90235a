#!/usr/bin/env bash
# Builds the small Debian test guest used by hyperjob's end-to-end tests and caches it.
#
#   scripts/build-guest-image.sh [OUT_DIR]
#
# OUT_DIR (default $HYPERJOB_IMAGE_DIR, else /var/lib/hyperjob-test/image) receives:
#   base.qcow2              ext4 root file system directly on /dev/vda (no partition table)
#   vmlinuz, initrd.img     linux-image-cloud-amd64 kernel + initramfs, for direct kernel boot
#   bootable.qcow2          whole disk that boots by itself (<boot dev='hd'/>) under BIOS and
#                           UEFI: MBR + SYSLINUX, vda1 = FAT16 with SYSLINUX, systemd-boot as
#                           \EFI\BOOT\BOOTX64.EFI, kernel and initrd, vda2 = the same ext4 root fs
#   id_ed25519(.pub)        client key pair; the public half is in gitlab-runner's authorized_keys
#   known_hosts             the guest's baked SSH host key(s), "* <type> <base64>" per line
#   ssh_host_ed25519_key    that host key's private half (dropbear format), reused on rebuilds
#   cloudinit.qcow2         ext4 root file system (like base.qcow2) of another guest, with
#                           Debian's cloud-init and OpenSSH instead of dropbear, no SSH key and
#                           no CI user: both come from a cloud-init NoCloud seed (a second disk
#                           or CD-ROM labelled cidata) at boot. Same vmlinuz/initrd.img.
#   stock.qcow2             a guest as stock cloud images are: Debian with systemd as PID 1,
#                           OpenSSH started by Debian's ssh.service, cloud-init with its four
#                           systemd stages, systemd-networkd. Three baked host keys (ed25519,
#                           ecdsa, rsa); gitlab-runner with id_ed25519.pub. Same vmlinuz/initrd.img.
#                           Built after the images above, next to them.
#   stock_known_hosts       those three host keys, "* <type> <base64>" per line
#   stock_ssh_host_{ed25519,ecdsa,rsa}_key
#                           their private halves (OpenSSH format), reused on rebuilds
#   image.env               shell-sourceable facts (KERNEL, INITRD, CMDLINE, BASE_IMAGE,
#                           BOOTABLE_IMAGE, CLOUDINIT_IMAGE, STOCK_IMAGE, ...)
#   stamp                   written last for the images but stock.qcow2: the sha256 of this
#                           script and of scripts/lib/guest-image.sh (which it sources), and the
#                           build parameters
#   stock.stamp             written last for stock.qcow2: the same facts
#
# Images whose stamp matches are reused as is. stock.qcow2 is built after the others, so a
# machine with up-to-date other images builds only stock.qcow2 if it is missing or incomplete;
# a rebuild of the others always rebuilds stock.qcow2 (and keeps every SSH key, see below).
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
readonly SYSTEMD_BOOT_EFI=/usr/lib/systemd/boot/efi/systemd-bootx64.efi
readonly REQUIRED_FILES="base.qcow2 bootable.qcow2 cloudinit.qcow2 vmlinuz initrd.img id_ed25519
    id_ed25519.pub known_hosts ssh_host_ed25519_key image.env stamp"

SELF=$(readlink -f -- "${BASH_SOURCE[0]}")
readonly SELF
PROG=$(basename -- "$SELF")
readonly PROG
# What goes into the guests (every image's mmdebstrap hooks) and stock.qcow2's build. Sourced
# on every start, so the hooks run by the script calling itself (main below) are found.
readonly LIB=${SELF%/*}/lib/guest-image.sh

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

# shellcheck source=scripts/lib/guest-image.sh
. "$LIB"

# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------

WORK=
CHILD=
OLD=
LOCKED=

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

# begin_work TEMPLATE: $WORK, a new directory (mktemp TEMPLATE) that a trap removes on exit or
# signal; end_work removes it (and $OLD) at once.
begin_work() {
    trap cleanup EXIT
    trap 'on_signal 130' INT
    trap 'on_signal 143' TERM
    trap 'on_signal 129' HUP
    WORK=$(mktemp -d "$1")
    chmod 0755 "$WORK"
}

end_work() {
    cleanup
    WORK=
    OLD=
}

# have_files DIR "FILE...": every FILE is in DIR and not empty.
have_files() {
    local dir=$1 f
    for f in $2; do
        [ -s "$dir/$f" ] || return 1
    done
}

image_complete() {
    have_files "$1" "$REQUIRED_FILES" && [ "$(cat "$1/stamp")" = "$STAMP" ]
}

# lock_builds PARENT: one build at a time per parent directory, held until exit. The caller
# checks again, holding it, whether there is still anything to build.
lock_builds() {
    [ -z "$LOCKED" ] || return 0
    check_searchable "$1"
    exec 9<"$1"
    flock 9
    LOCKED=1
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

# bootable.qcow2, for the bootloader path (no <kernel>: SeaBIOS or OVMF boots the disk), a
# hybrid disk as Debian's cloud images are. Assembled from plain files, without mounting
# anything and without loop devices:
#   MBR     SYSLINUX's mbr.bin (boots the active partition), DOS partition table
#   vda1    FAT16, active, type e: ldlinux.sys/ldlinux.c32 (syslinux's mtools installer),
#           syslinux.cfg, vmlinuz, initrd.img; for UEFI systemd-boot as the removable-media
#           loader \EFI\BOOT\BOOTX64.EFI (OVMF looks for it on every FAT partition, so no GPT
#           or ESP type is needed) with loader/loader.conf and loader/entries/hyperjob.conf
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
    # UEFI: systemd-boot boots its one entry at once (timeout 0): the same kernel and command line.
    printf 'timeout 0\ndefault hyperjob.conf\nconsole-mode keep\n' >"$work/loader.conf"
    cat >"$work/hyperjob.conf" <<EOF
title hyperjob test guest
linux /vmlinuz
initrd /initrd.img
options $BOOT_CMDLINE
EOF
    MTOOLS_SKIP_CHECK=1 mmd -i "$fat" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ||
        die "mmd on the boot file system failed"
    MTOOLS_SKIP_CHECK=1 mcopy -i "$fat" -- "$SYSTEMD_BOOT_EFI" ::/EFI/BOOT/BOOTX64.EFI ||
        die "mcopy of $SYSTEMD_BOOT_EFI failed"
    MTOOLS_SKIP_CHECK=1 mcopy -i "$fat" -- "$work/loader.conf" ::/loader/ ||
        die "mcopy of loader.conf failed"
    MTOOLS_SKIP_CHECK=1 mcopy -i "$fat" -- "$work/hyperjob.conf" ::/loader/entries/ ||
        die "mcopy of the boot entry failed"
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

# The images but stock.qcow2, into OUT (a new directory, swapped in by rename), unless another
# build made them while this one waited for the lock.
build_images() {
    local out=$1 parent start
    parent=$(dirname "$out")
    (umask 022 && mkdir -p "$parent")
    lock_builds "$parent"
    if image_complete "$out"; then
        log "up to date: $out (built concurrently)"
        return 0
    fi

    start=$(date +%s)
    begin_work "$parent/.$(basename "$out").build.XXXXXX"
    build "$out" "$WORK"
    # The swap below removes the old directory: keep the stock guest's host keys for its build.
    stock_carry_keys "$out" "$WORK/out"

    # Swap in: the stamp is inside, so a half-moved or missing directory never looks complete.
    if [ -e "$out" ]; then
        OLD=$out.old.$$
        mv -T -- "$out" "$OLD"
    fi
    mv -T -- "$WORK/out" "$out"
    end_work

    log "built $out in $(( $(date +%s) - start )) s; base.qcow2: $(du -m --apparent-size "$out/base.qcow2" | cut -f1) MiB file, $(qemu-img info "$out/base.qcow2" | sed -n 's/^virtual size: \([^(]*\) (.*/\1/p') virtual; bootable.qcow2: $(du -m --apparent-size "$out/bootable.qcow2" | cut -f1) MiB file; cloudinit.qcow2: $(du -m --apparent-size "$out/cloudinit.qcow2" | cut -f1) MiB file"
}

main() {
    case "${1:-}" in
    __essential-hook) essential_hook "$2"; return ;;
    __customize-hook) customize_hook "$2" "$3" "$4"; return ;;
    __customize-hook-cloudinit) customize_hook_cloudinit "$2" "$3"; return ;;
    __customize-hook-stock) customize_hook_stock "$2" "$3" "$4" "$5"; return ;;
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
    for tool in mmdebstrap mkfs.ext4 qemu-img ssh-keygen flock mkfs.fat mcopy mdir mmd \
        syslinux sfdisk truncate debugfs; do
        command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
    done
    [ -s "$SYSLINUX_MBR" ] || die "$SYSLINUX_MBR not found (run scripts/install-deps.sh)"
    [ -s "$SYSTEMD_BOOT_EFI" ] || die "$SYSTEMD_BOOT_EFI not found (run scripts/install-deps.sh)"
    out=$(realpath -m -- "$out")

    # The stamps: every file of the code that shapes the images (this script and its library;
    # both shape all of them) and the build parameters.
    local facts
    facts="script=$(sha256sum -- "$SELF" | cut -d' ' -f1) lib=$(sha256sum -- "$LIB" | cut -d' ' -f1)"
    facts+=" suite=$SUITE mirror=$MIRROR free_mb=$FREE_MB hostname=$GUEST_HOSTNAME"
    facts+=" extra=${HYPERJOB_IMAGE_EXTRA_PACKAGES:-}"
    STAMP="hyperjob-guest-image $facts"
    STOCK_STAMP="hyperjob-stock-image $facts"

    if image_complete "$out"; then
        log "up to date: $out"
    else
        build_images "$out"
    fi
    build_stock_unless_complete "$out"
}

main "$@"
