#!/bin/bash
# Builds the patched QEMU (qemu-patches/*.patch applied to Debian's QEMU source from
# bookworm-backports) as one x86_64 binary, into a cache OUTSIDE the checkout:
#
#   $VMBEAM_QEMU_CACHE (default /var/cache/vmbeam-kvm/qemu)/<key>/qemu-system-x86_64
#
# <key> = sha256 of the patch files, this script and the source tarball (name + sha256),
# so a fresh clone on the same machine reuses the binary and a second run builds nothing.
# The binary finds Debian's firmware by itself (--firmwarepath, no -L needed).
#
#   scripts/build-qemu.sh               build if needed; the last stdout line is the path
#   scripts/build-qemu.sh --print-path  print the path if built (exit 1 if not); never builds
#   scripts/build-qemu.sh --print-key   print the cache key
#   scripts/build-qemu.sh --keep-build  keep the build tree (<cache>/<key>.build) afterwards
#
# Progress goes to stderr.  On failure the whole log stays in <cache>/<key>.log.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${VMBEAM_QEMU_CACHE:-/var/cache/vmbeam-kvm/qemu}
SUITE=bookworm-backports
JOBS=${VMBEAM_QEMU_JOBS:-$(nproc)}
BIN=qemu-system-x86_64

mode=build keep=0
for arg in "$@"; do
    case $arg in
        --print-path) mode=path ;;
        --print-key) mode=key ;;
        --keep-build) keep=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "build-qemu: unknown option $arg" >&2; exit 2 ;;
    esac
done

START=$SECONDS
step() { printf 'build-qemu: [%3ds] %s\n' $((SECONDS - START)) "$*" >&2; }
die() { echo "build-qemu: error: $*" >&2; exit 1; }

# The orig tarball apt would fetch for `apt-get source -t $SUITE qemu`:
# "'URI' NAME SIZE SHA256:HEX".  Only the +ds orig tarball is used (the Debian packaging
# is not needed, and its .dsc is not always downloadable from the archive).
source_line() {
    apt-get source --print-uris -t "$SUITE" qemu 2>/dev/null \
        | grep -E "^'[^']+' qemu_[^ ]+\.orig\.tar\.[a-z0-9]+ [0-9]+ SHA256:" | head -1
}

ensure_deb_src() {
    [ -n "$(source_line)" ] && return 0
    [ "$(id -u)" = 0 ] || die "no deb-src for $SUITE and not root: cannot add one"
    step "adding a deb-src entry for $SUITE"
    cat > /etc/apt/sources.list.d/vmbeam-qemu-src.sources <<'SRC'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq
    [ -n "$(source_line)" ] || die "apt-get source --print-uris -t $SUITE qemu finds no source"
}

[ "$mode" = build ] && ensure_deb_src
SRC_LINE=$(source_line)
[ -n "$SRC_LINE" ] || die "no QEMU source known to apt for $SUITE (apt-get update? deb-src?)"
read -r SRC_URI SRC_FILE SRC_SIZE SRC_SUM <<<"$SRC_LINE"
SRC_URI=${SRC_URI//\'/}
SRC_SUM=${SRC_SUM#SHA256:}

mapfile -t PATCHES < <(find "$ROOT/qemu-patches" -maxdepth 1 -name '*.patch' | sort)
[ ${#PATCHES[@]} -gt 0 ] || die "no patches in $ROOT/qemu-patches"
KEY=$( { for p in "${PATCHES[@]}"; do echo "== $(basename "$p")"; cat "$p"; done
         echo "== build-qemu.sh"; cat "$0"
         echo "== source $SRC_FILE $SRC_SUM"; } | sha256sum | cut -c1-16)
OUT=$CACHE/$KEY
if [ "$mode" = key ]; then echo "$KEY"; exit 0; fi
if [ -x "$OUT/$BIN" ] && [ -e "$OUT/stamp" ]; then
    step "up to date ($SRC_FILE + ${#PATCHES[@]} patches, key $KEY): nothing to build"
    echo "$OUT/$BIN"
    exit 0
fi
if [ "$mode" = path ]; then
    echo "build-qemu: the patched QEMU (key $KEY) is not built: run scripts/build-qemu.sh" >&2
    exit 1
fi

[ "$(id -u)" = 0 ] || die "must run as root (installs build packages, writes $CACHE)"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9     # one build at a time; a waiter finds the finished build below
if [ -x "$OUT/$BIN" ] && [ -e "$OUT/stamp" ]; then echo "$OUT/$BIN"; exit 0; fi

LOG=$CACHE/$KEY.log
WORK=$CACHE/$KEY.build
: > "$LOG"
trap 'rc=$?; if [ $rc != 0 ]; then echo "build-qemu: FAILED (rc=$rc) after $((SECONDS - START)) s; last lines of $LOG:" >&2; tail -n 25 "$LOG" >&2; echo "build-qemu: full log kept in $LOG" >&2; fi' EXIT
run() { "$@" >>"$LOG" 2>&1; }
# Stale package lists are the usual reason an install fails: refresh once and retry.
apt_install() { run apt-get install -y -qq "$@" || { run apt-get update -qq && run apt-get install -y -qq "$@"; }; }

step "1/6 build packages"
export DEBIAN_FRONTEND=noninteractive
need=()
for p in gcc make pkg-config ninja-build flex bison git xz-utils python3-venv \
         libglib2.0-dev libgnutls28-dev libpixman-1-dev zlib1g-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    step "      installing ${need[*]}"
    apt_install "${need[@]}" || die "could not install ${need[*]}"
fi
# QEMU 10 needs meson >= 1.5 (Debian 12 has 1.0) and pycotap: both from backports.
meson_ok() { command -v meson >/dev/null && dpkg --compare-versions "$(meson --version)" ge 1.5; }
if ! meson_ok || ! dpkg-query -W -f='${Status}' python3-pycotap 2>/dev/null | grep -q 'ok installed'; then
    step "      installing meson and python3-pycotap from $SUITE"
    apt_install -t "$SUITE" meson python3-pycotap || die "could not install meson from $SUITE"
fi
meson_ok || die "meson >= 1.5 is needed, have $(meson --version 2>/dev/null || echo none)"

step "2/6 source $SRC_FILE"
TARBALL=$CACHE/src/$SRC_FILE
if [ ! -e "$TARBALL" ] || [ "$(sha256sum < "$TARBALL" | cut -d' ' -f1)" != "$SRC_SUM" ]; then
    mkdir -p "$CACHE/src"
    # apt-get source also wants the Debian .dsc/.debian.tar, which the archive does not
    # always keep for backports: only the orig tarball (checked below) matters.
    (cd "$CACHE/src" && apt-get source --download-only -t "$SUITE" qemu >>"$LOG" 2>&1) || true
    [ -e "$TARBALL" ] || die "could not download $SRC_URI"
fi
[ "$(sha256sum < "$TARBALL" | cut -d' ' -f1)" = "$SRC_SUM" ] || die "$TARBALL: bad sha256"

step "3/6 unpack and apply ${#PATCHES[@]} patches"
rm -rf "$WORK"
mkdir -p "$WORK"
run tar -xf "$TARBALL" -C "$WORK" --strip-components=1 --no-same-owner
for p in "${PATCHES[@]}"; do
    step "      $(basename "$p")"
    run git -C "$WORK" apply --whitespace=nowarn "$p" || die "$(basename "$p") does not apply"
done

step "4/6 configure"
# Everything the project uses and nothing else: TCG and KVM, gnutls (TLS-PSK migration
# streams), pixman (the default VGA of pc/q35), vhost-net; tap/socket netdevs, ivshmem,
# virtio, e1000, q35/pc and memfd backends come with the default device set.  The prefix
# is never installed to: it only has to differ from /usr so that the firmware path below
# is used verbatim wherever the binary lives.
CONFIGURE=(--python=/usr/bin/python3 --prefix=/opt/vmbeam-kvm-qemu
    --target-list=x86_64-softmmu --without-default-features
    --enable-kvm --enable-tcg --enable-gnutls --enable-pixman
    --enable-vhost-kernel --enable-vhost-net
    --disable-docs --disable-download --disable-install-blobs --disable-debug-info
    --disable-werror
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu)
mkdir -p "$WORK/build"
(cd "$WORK/build" && nice -n 10 ../configure "${CONFIGURE[@]}") >>"$LOG" 2>&1 \
    || die "configure failed"

step "5/6 build $BIN with $JOBS jobs (several minutes)"
(cd "$WORK/build" && nice -n 10 ninja -j "$JOBS" "$BIN") >>"$LOG" 2>&1 &
ninja_pid=$!
while kill -0 "$ninja_pid" 2>/dev/null; do
    sleep 30
    prog=$(grep -aoE '^\[[0-9]+/[0-9]+\]' "$LOG" | tail -1 || true)
    kill -0 "$ninja_pid" 2>/dev/null && step "      ${prog:-starting}"
done
wait "$ninja_pid" || die "build failed"

step "6/6 install and smoke test"
tmp=$(mktemp -d "$CACHE/$KEY.tmp.XXXXXX")
chmod 755 "$tmp"
cp "$WORK/build/$BIN" "$tmp/$BIN"
strip "$tmp/$BIN" 2>/dev/null || true
# Boots far enough to load Debian's firmware (bios-256k.bin) and answers QMP.
reply=$(printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-commands"}' \
        '{"execute":"query-migrate-capabilities"}' '{"execute":"quit"}' \
    | timeout 30 "$tmp/$BIN" -machine q35 -accel tcg -nodefaults -display none -S \
        -qmp stdio 2>>"$LOG") || die "smoke test: $BIN did not start"
for want in x-revoke-memory-backend x-ignore-shared-check; do
    grep -q "\"$want\"" <<<"$reply" || die "smoke test: $want missing from QMP"
done
{
    echo "source=$SRC_FILE sha256=$SRC_SUM"
    for p in "${PATCHES[@]}"; do echo "patch=$(basename "$p") sha256=$(sha256sum < "$p" | cut -c1-64)"; done
    echo "configure=${CONFIGURE[*]}"
    echo "build_seconds=$((SECONDS - START)) jobs=$JOBS host_cpus=$(nproc)"
    echo "built=$(date -u +%FT%TZ)"
} > "$tmp/stamp"
mv "$LOG" "$tmp/build.log"
rm -rf "$OUT"
mv "$tmp" "$OUT"
[ "$keep" = 1 ] || rm -rf "$WORK"
trap - EXIT
step "done in $((SECONDS - START)) s: $OUT/$BIN"
echo "$OUT/$BIN"
