#!/bin/bash
# Fetches the Debian 12 cloud kernel and turns it into what the image needs:
#   $OUTDIR/vmlinux          uncompressed ELF (QEMU boots it via its PVH note,
#                            skipping the slow-under-TCG bzImage decompressor)
#   $OUTDIR/modules/*.ko     virtio_net and its deps (virtio is modular here)
#   $OUTDIR/modules/load     insmod order for /init
#   $OUTDIR/kernel.version   package name, so a rebuild can tell what it used
# Usage: build-kernel.sh CACHEDIR OUTDIR
set -euo pipefail
cache=$1 out=$2
mkdir -p "$cache" "$out"

# The metapackage tracks the current ABI; its dependency is the real package.
pkg=$(apt-cache depends linux-image-cloud-amd64 \
      | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)
[ -n "$pkg" ] || { echo "build-kernel: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
ver=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
deb="$cache/${pkg}_${ver}_amd64.deb"
deb=${deb//:/%3a}

tmp=$(mktemp -d "$out/tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
if [ ! -s "$deb" ]; then
    # apt-get download writes to cwd; a temp dir keeps half-downloads out of
    # the cache.  As root it warns that _apt cannot write there: harmless.
    (cd "$tmp" && apt-get download -q "$pkg=$ver")
    mv "$tmp/$(basename "$deb")" "$deb"
fi

x=$tmp/x
dpkg-deb -x "$deb" "$x"
bz=$(echo "$x"/boot/vmlinuz-*)
kver=${bz##*/vmlinuz-}

# The boot protocol header says where the compressed payload is, so we need not
# guess from magic bytes alone; the magic then tells us the compressor.
read -r off len < <(python3 - "$bz" <<'EOF'
import struct, sys
d = open(sys.argv[1], 'rb').read(0x260)
assert d[0x202:0x206] == b'HdrS', 'not a bzImage'
setup_sects = d[0x1f1] or 4
po, pl = struct.unpack_from('<II', d, 0x248)
print((setup_sects + 1) * 512 + po, pl)
EOF
)
magic=$(od -An -tx1 -j "$off" -N6 "$bz" | tr -d ' \n')
# The kernel appends the decompressed size (4 bytes) after the stream; the
# decompressors treat it as trailing junk and fail, so drop it.
slice() { dd if="$bz" iflag=skip_bytes,count_bytes skip="$1" count="$2" status=none; }
payload() { slice "$off" $((len - 4)); }
case $magic in
    02214c18*)    comp=lz4;  payload | lz4 -dc ;;
    28b52ffd*)    comp=zstd; payload | zstd -dc ;;
    fd377a585a00) comp=xz;   payload | xz -dc ;;
    1f8b*)        comp=gzip; payload | gzip -dc ;;
    *) echo "build-kernel: unknown payload compression (magic $magic)" >&2; exit 1 ;;
esac > "$tmp/vmlinux"

want=$(slice $((off + len - 4)) 4 | od -An -tu4 | tr -d ' ')
got=$(stat -c %s "$tmp/vmlinux")
[ "$want" = "$got" ] || { echo "build-kernel: decompressed $got bytes, header says $want" >&2; exit 1; }
# Without the XEN_ELFNOTE_PHYS32_ENTRY (18) note QEMU would refuse -kernel vmlinux.
readelf -n "$tmp/vmlinux" | grep -cE 'note type: \(0x00000012\)|PHYS32_ENTRY' >/dev/null \
    || { echo "build-kernel: vmlinux has no PVH entry note" >&2; exit 1; }
mv "$tmp/vmlinux" "$out/vmlinux"

# Modules: resolve virtio_net's and virtio_blk's dependency closure from each .ko's modinfo
# strings; the .deb has no modules.dep (depmod runs at install time) and the
# host need not have kmod.
rm -rf "$out/modules"
mkdir -p "$out/modules"
moddir="$x/lib/modules/$kver"
order=()
add() {
    local name=$1 f dep
    for f in "${order[@]}"; do [ "$f" = "$name" ] && return 0; done
    f=$(find "$moddir" -name "$name.ko" | head -n1)
    [ -n "$f" ] || { echo "build-kernel: module $name not found" >&2; exit 1; }
    for dep in $(strings -a "$f" | sed -n "s/^depends=//p" | tr , " "); do add "$dep"; done
    order+=("$name")
    cp "$f" "$out/modules/"
}
for m in virtio_pci virtio_net virtio_blk; do add "$m"; done
printf '%s\n' "${order[@]}" > "$out/modules/load"
echo "$pkg $ver" > "$out/kernel.version"
echo "build-kernel: $pkg $ver ($kver), $comp payload, modules: ${order[*]}"
