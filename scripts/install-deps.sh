#!/usr/bin/env bash
# Installs the Debian packages hyperjob needs to build, to run real VMs (libvirt + QEMU)
# and to build the small test guest image. Idempotent; safe to run on every CI start.
# QEMU and libvirt come from bookworm-backports because the machine's preinstalled
# qemu-utils is the backports version (see docs/testing.md).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: must run as root (it installs Debian packages)" >&2
    exit 1
fi

# shellcheck source=/dev/null
. /etc/os-release
codename=${VERSION_CODENAME:-bookworm}

backports_list=/etc/apt/sources.list.d/hyperjob-backports.list
if ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian ${codename}-backports main" >"$backports_list"
fi

export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -o Dpkg::Use-Pty=0 -o APT::Get::Assume-Yes=true "$@"; }

apt_get update -qq
# libvirt-daemon-driver-nwfilter + libvirt-daemon-config-nwfilter (libvirt-daemon-system pulls
# them in too): the nwfilter driver and its stock filters, clean-traffic among them, which every
# guest's interface is bound to (README "Network isolation"); the driver needs ebtables and
# iptables, both from the package iptables (below).
apt_get install -qq --no-install-recommends -t "${codename}-backports" \
    qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-daemon-driver-qemu \
    libvirt-daemon-driver-nwfilter libvirt-daemon-config-nwfilter \
    libvirt-clients libvirt-dev mmdebstrap >/dev/null
# iptables: the firewall backend libvirt's network driver picks first (network.conf) for the
# NAT network inside the test namespace, and ebtables + iptables for the nwfilter driver;
# dnsmasq-base: its DHCP server; iproute2: `ip netns`; util-linux: flock. git: also the host
# side of the tests (`git daemon`). strace: the secrets test records every exec of the driver
# and its children.
# syslinux, syslinux-common, mtools, dosfstools, fdisk (sfdisk): the guest image's bootable
# variant (MBR + FAT boot partition + SYSLINUX), assembled from plain files without mounting.
# genisoimage (xorriso as the fallback): cloud-init NoCloud seeds, ISO9660 images labelled
# cidata, for guests such as cloudinit.qcow2 (`genisoimage -output SEED -volid cidata -joliet
# -rock user-data meta-data`, or `xorriso -as mkisofs` with the same flags).
# ovmf: UEFI firmware for x86 guests with its descriptors in /usr/share/qemu/firmware, which
# libvirt's firmware autoselection reads (`firmware = "efi"`; tests/e2e_machine.rs).
# systemd-boot-efi: systemd-bootx64.efi, bootable.qcow2's UEFI boot loader.
# virtinst: virt-install, which the baseline of scripts/bench.sh (GitLab's documented shell
# driver) creates its guests with.
apt_get install -qq --no-install-recommends \
    libssh2-1-dev libssl-dev pkg-config e2fsprogs openssh-client iproute2 dnsmasq-base \
    iptables util-linux git ca-certificates procps strace \
    syslinux syslinux-common mtools dosfstools fdisk genisoimage xorriso ovmf systemd-boot-efi \
    virtinst >/dev/null
echo "install-deps.sh: packages installed"
