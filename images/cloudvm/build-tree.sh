#!/bin/bash
# Builds the cloud-VM root tree $D/tree (debootstrap minbase + packages + the
# kernel modules matching $LINUX/vmlinux) unless $D/tree.hash already records
# the current recipe.  The tree is made in $D/tree.new and swapped in at the end,
# so an interrupted build never leaves a half tree behind a valid hash.
# Usage: build-tree.sh HERE D CACHE LINUX
set -euo pipefail
here=$1 d=$2 cache=$3 linux=$4
mirror=${VMBEAM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
secmirror=${VMBEAM_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

hash=$(cat "$here/build-tree.sh" "$here/packages" "$here/Makefile" "$linux/kernel.version" \
       | sha256sum | cut -c1-16)
if [ -d "$d/tree" ] && [ "$(cat "$d/tree.hash" 2>/dev/null)" = "$hash" ]; then
    exit 0
fi

read -r kpkg kdebver < "$linux/kernel.version"
mkdir -p "$d" "$cache/cloudvm-debootstrap" "$cache/cloudvm-apt"
new=$d/tree.new
rm -rf "$new" "$d/kx"
# Keep whatever apt downloaded even if the build fails half-way.
save_debs() {
    [ -d "$new/var/cache/apt/archives" ] &&
        find "$new/var/cache/apt/archives" -name '*.deb' -exec cp -ln {} "$cache/cloudvm-apt/" \;
    return 0
}
trap 'save_debs; rm -rf "$new" "$d/kx"' EXIT

# The same .deb images/linux cut vmlinux from, so modules and kernel match.
deb=$cache/${kpkg}_${kdebver}_amd64.deb
deb=${deb//:/%3a}
if [ ! -s "$deb" ]; then
    mkdir -p "$d/kx" && (cd "$d/kx" && apt-get download -q "$kpkg=$kdebver")
    mv "$d/kx/$(basename "$deb")" "$deb"
fi

debootstrap --variant=minbase --cache-dir="$cache/cloudvm-debootstrap" bookworm "$new" "$mirror"

cat > "$new/etc/apt/sources.list" <<SRC
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $secmirror bookworm-security main
deb $mirror bookworm-backports main
SRC
# Docs, man pages and translations are dead weight in a VM nobody logs into.
cat > "$new/etc/dpkg/dpkg.cfg.d/01-vmbeam-nodoc" <<'CFG'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
rm -rf "$new"/usr/share/{doc,man,info,locale,lintian}/*
# No services may start inside the build chroot.
printf '#!/bin/sh\nexit 101\n' > "$new/usr/sbin/policy-rc.d"
chmod 755 "$new/usr/sbin/policy-rc.d"

# Reuse earlier downloads: hard links in, new .debs linked back out afterwards.
find "$cache/cloudvm-apt" -name '*.deb' -exec cp -l {} "$new/var/cache/apt/archives/" \;
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
inch() { chroot "$new" "$@"; }
inch apt-get update -q
inch apt-get -y -q dist-upgrade
# `name/suite` lines are installed with `-t suite`: apt does not by itself take
# the dependencies pinned to the same version (qemu-system-common, seabios...)
# from that suite.
mapfile -t pkgs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/packages")
plain=() suites=()
for p in "${pkgs[@]}"; do
    case $p in */*) suites+=("${p#*/}") ;; *) plain+=("$p") ;; esac
done
inch apt-get install -y -q --no-install-recommends "${plain[@]}"
for s in $(printf '%s\n' "${suites[@]}" | sort -u); do
    mapfile -t these < <(printf '%s\n' "${pkgs[@]}" | sed -n "s|/$s\$||p")
    inch apt-get install -y -q --no-install-recommends -t "$s" "${these[@]}"
done
save_debs
inch apt-get clean
rm -rf "$new"/var/lib/apt/lists/* "$new"/var/cache/apt/*.bin "$new"/var/log/* \
       "$new/usr/sbin/policy-rc.d"

# Kernel modules only (no /boot, no initramfs-tools): the kernel is booted by
# QEMU -kernel from the host side.
mkdir -p "$d/kx"
dpkg-deb -x "$deb" "$d/kx"
kver=$(ls "$d/kx/lib/modules")
mkdir -p "$new/usr/lib/modules"
cp -a "$d/kx/lib/modules/$kver" "$new/usr/lib/modules/"
inch depmod "$kver"

echo cloudvm > "$new/etc/hostname"
printf '127.0.0.1 localhost\n' > "$new/etc/hosts"
: > "$new/etc/fstab"
mkdir -p "$new/opt/vmbeam"

rm -rf "$d/tree"
mv "$new" "$d/tree"
echo "$hash" > "$d/tree.hash"
echo "build-tree: $(du -sh "$d/tree" | cut -f1) tree, kernel modules $kver, recipe $hash"
