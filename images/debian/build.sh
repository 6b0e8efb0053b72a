#!/bin/bash
# Builds the Debian guest disk $OUT/debian.qcow2: an MBR disk SeaBIOS boots through
# SYSLINUX (partition 1, FAT: the kernel, its initramfs, syslinux.cfg) into Debian 12
# (partition 2, ext4: debootstrap minbase + ./packages, the Debian cloud kernel of
# images/linux). Nothing is mounted and no loop device is used: mkfs.vfat, mke2fs -d and
# syslinux write at the partitions' offsets in the file. Rebuilt only when its recipe hash
# (this script, packages, the kernel package) changes.
# Usage: build.sh HERE OUT CACHE
set -euo pipefail
here=$1 out=$2 cache=$3
mirror=${VMBEAM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
secmirror=${VMBEAM_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
img=$out/debian.qcow2 d=$out/debian.obj
linux=$out/linux
hash=$(cat "$here/build.sh" "$here/packages" "$linux/kernel.version" | sha256sum | cut -c1-16)
if [ -s "$img" ] && [ "$(cat "$out/debian.hash" 2>/dev/null)" = "$hash" ]; then
    exit 0
fi
read -r kpkg kdebver < "$linux/kernel.version"
mkdir -p "$cache/cloudvm-debootstrap" "$cache/debian-apt"
rm -rf "$d" && mkdir -p "$d"
tree=$d/tree
log=$out/debian-build.log
echo "debian: building the Debian guest disk (debootstrap + packages, a few minutes; log $log)"
exec 3>&1 >"$log" 2>&1
save_debs() {
    [ -d "$tree/var/cache/apt/archives" ] &&
        find "$tree/var/cache/apt/archives" -name '*.deb' -exec cp -ln {} "$cache/debian-apt/" \;
    return 0
}
# shellcheck disable=SC2317  # the trap's
finish() {
    rc=$?
    save_debs; rm -rf "$d"
    [ $rc -eq 0 ] || { tail -n 20 "$log" >&3; echo "debian: build failed (rc $rc), log $log" >&3; }
}
trap finish EXIT

debootstrap --variant=minbase --cache-dir="$cache/cloudvm-debootstrap" bookworm "$tree" "$mirror"
cat > "$tree/etc/apt/sources.list" <<SRC
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $secmirror bookworm-security main
SRC
printf '#!/bin/sh\nexit 101\n' > "$tree/usr/sbin/policy-rc.d"  # no services in the chroot
chmod 755 "$tree/usr/sbin/policy-rc.d"
find "$cache/debian-apt" -name '*.deb' -exec cp -l {} "$tree/var/cache/apt/archives/" \;
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
inch() { chroot "$tree" "$@"; }
inch apt-get update -q
mapfile -t pkgs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/packages")
# The kernel: the same package images/linux boots (one download serves both).
inch apt-get install -y -q --no-install-recommends "${pkgs[@]}" "$kpkg=$kdebver"
save_debs
inch apt-get clean

# cloud-init: only the NoCloud seed (vmbeam-kvm's --cloud-init) is looked for, so a guest
# without one does not wait on network datasources; one SSH host key type (an RSA-3072 key
# alone took 10 s of a 55 s first boot under TCG); no GRUB here; C.UTF-8 needs no locale-gen.
cat > "$tree/etc/cloud/cloud.cfg.d/90-vmbeam.cfg" <<'CFG'
datasource_list: [NoCloud, None]
ssh_genkeytypes: [ed25519]
locale: C.UTF-8
grub_dpkg: {enabled: false}
CFG
cat > "$tree/etc/fstab" <<'FSTAB'
LABEL=debian-root / ext4 errors=remount-ro 0 1
FSTAB
echo debian > "$tree/etc/hostname"
printf '127.0.0.1 localhost\n' > "$tree/etc/hosts"
# First boot makes them: a machine-id and SSH host keys of its own, not the image's.
: > "$tree/etc/machine-id"
rm -f "$tree"/etc/ssh/ssh_host_* "$tree/var/lib/dbus/machine-id" "$tree/usr/sbin/policy-rc.d"
rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin "$tree"/var/log/*
kver=$(ls "$tree/lib/modules")

# Partition 1 (FAT, from 1 MiB): SYSLINUX + kernel + initramfs; partition 2: the root.
boot_mb=96
root_mb=$(( $(du -sm --apparent-size "$tree" | cut -f1) * 12 / 10 + 600 ))
raw=$d/disk.raw
truncate -s $(( (1 + boot_mb + root_mb) ))M "$raw"
printf 'label: dos\nstart=1MiB, size=%sMiB, type=c, bootable\nstart=%sMiB, type=83\n' \
    "$boot_mb" $(( 1 + boot_mb )) | sfdisk -q "$raw"
mkfs.vfat -F 16 -n DEBIANBOOT --offset 2048 "$raw" $(( boot_mb * 1024 )) >/dev/null
cat > "$d/syslinux.cfg" <<CFG
DEFAULT debian
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL debian
  KERNEL vmlinuz
  INITRD initrd.img
  APPEND root=LABEL=debian-root ro console=ttyS0,115200 net.ifnames=0 quiet
CFG
cp "$tree/boot/vmlinuz-$kver" "$d/vmlinuz"
cp "$tree/boot/initrd.img-$kver" "$d/initrd.img"
mcopy -i "$raw@@1M" "$d/vmlinuz" "$d/initrd.img" "$d/syslinux.cfg" ::/
syslinux --offset $(( 1 << 20 )) --install "$raw"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
mke2fs -q -F -t ext4 -L debian-root -E offset=$(( (1 + boot_mb) << 20 )) -d "$tree" \
    "$raw" "${root_mb}M"
qemu-img convert -q -c -f raw -O qcow2 "$raw" "$img.tmp"
mv "$img.tmp" "$img"
echo "$hash" > "$out/debian.hash"
echo "debian: $(du -h "$img" | cut -f1) qcow2 ($(( 1 + boot_mb + root_mb )) MiB disk), kernel $kver" >&3
