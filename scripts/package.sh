#!/usr/bin/env bash
# Builds target/debian/hyperjob_<version>_<arch>.deb from the repository, with dpkg-deb:
#   /usr/bin/hyperjob                      the release binary
#   /etc/hyperjob/config.toml              config.example.toml, a conffile, 0600
#   /lib/systemd/system/hyperjob-{gc,pool}.{service,timer}   (packaging/systemd; not enabled)
#   /usr/share/doc/hyperjob/               README.md, docs/*.md, config.example.toml
# Depends: the packages of the shared libraries the binary links (found with dpkg -S), and the
# tools hyperjob runs (qemu-img; genisoimage or xorriso). Prints the package's path.
set -euo pipefail

cd "$(dirname -- "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
[ -n "$version" ] || { echo "package.sh: no version in Cargo.toml" >&2; exit 1; }

cargo build --release --locked --quiet --bin hyperjob
binary=target/release/hyperjob

out=target/debian
stage=$out/stage
rm -rf -- "$stage"
mkdir -p "$stage/DEBIAN" "$stage/usr/bin" "$stage/etc/hyperjob" \
    "$stage/lib/systemd/system" "$stage/usr/share/doc/hyperjob/docs"
install -m 0755 "$binary" "$stage/usr/bin/hyperjob"
strip --strip-unneeded "$stage/usr/bin/hyperjob"
install -m 0600 config.example.toml "$stage/etc/hyperjob/config.toml"
install -m 0644 packaging/systemd/*.service packaging/systemd/*.timer "$stage/lib/systemd/system/"
install -m 0644 README.md config.example.toml "$stage/usr/share/doc/hyperjob/"
install -m 0644 docs/*.md "$stage/usr/share/doc/hyperjob/docs/"

# The packages that ship the libraries the binary links.
libs=$(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $3}')
depends=$(for lib in $libs; do dpkg -S "$(readlink -f "$lib")" 2>/dev/null || dpkg -S "$lib"; done |
    cut -d: -f1 | sort -u | paste -sd, - | sed 's/,/, /g')
[ -n "$depends" ] || { echo "package.sh: found no library packages for $binary" >&2; exit 1; }
installed_size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)

cat >"$stage/DEBIAN/control" <<CONTROL
Package: hyperjob
Version: $version
Architecture: $arch
Maintainer: hyperjob developers <hyperjob@localhost>
Installed-Size: $installed_size
Depends: $depends, qemu-utils, genisoimage | xorriso
Recommends: libvirt-daemon-system, qemu-system-x86 | qemu-system
Section: devel
Priority: optional
Homepage: https://example.invalid/hyperjob
Description: GitLab Runner Custom executor driver: every CI job in a fresh VM
 hyperjob creates a fresh virtual machine for each GitLab CI job from a
 copy-on-write overlay of a base image (libvirt by default), runs each stage's
 script in it over SSH and destroys everything afterwards. Configure
 /etc/hyperjob/config.toml, check the host with "hyperjob doctor", and wire it
 into [runners.custom]; see /usr/share/doc/hyperjob/README.md.
CONTROL
echo /etc/hyperjob/config.toml >"$stage/DEBIAN/conffiles"
cat >"$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    # The config holds paths to keys: readable by root only (the runner's custom executor
    # runs hyperjob as the runner's user, root unless configured otherwise).
    chmod 0600 /etc/hyperjob/config.toml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || true
    fi
fi
POSTINST
cat >"$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm"

deb="$out/hyperjob_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
rm -rf -- "$stage"
echo "$deb"
