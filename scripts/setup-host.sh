#!/bin/bash
# Installs the host packages vmbeam-kvm needs (idempotent; cached by a stamp that
# changes with this script). QEMU 10.0 comes from bookworm-backports (docs/design.md §4.2).
set -euo pipefail
cd "$(dirname "$0")/.."
STAMP_DIR=build/stamps
mkdir -p "$STAMP_DIR"
stamp="$STAMP_DIR/host-$(sha256sum scripts/setup-host.sh | cut -c1-16)"
if [ -e "$stamp" ] && command -v qemu-system-x86_64 >/dev/null \
   && qemu-system-x86_64 --version | grep -q 'version 10\.'; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "setup-host: must run as root to install packages" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
src=/etc/apt/sources.list.d/vmbeam-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > "$src" <<'SRC'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -qq
apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
apt-get install -y -qq gcc make python3-venv python3-dev libffi-dev busybox-static \
    lz4 cpio binutils debootstrap e2fsprogs iproute2 openssh-client openssh-server \
    syslinux syslinux-common mtools dosfstools fdisk >/dev/null
touch "$stamp"
