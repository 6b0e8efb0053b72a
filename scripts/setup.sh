#!/bin/bash
# One-stop, idempotent setup: host packages, Python venv, native module, guest images.
# Each step is skipped when its inputs have not changed (stamps under build/stamps).
set -euo pipefail
cd "$(dirname "$0")/.."
STAMPS=build/stamps
mkdir -p "$STAMPS"

step() { echo "setup: $*" >&2; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

bash scripts/setup-host.sh

venv_stamp="$STAMPS/venv-$(hash_of pyproject.toml)"
if [ ! -e "$venv_stamp" ] || [ ! -x .venv/bin/python ]; then
    step "creating Python venv (.venv)"
    rm -rf .venv
    python3 -m venv .venv
    .venv/bin/pip install -q -U pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$venv_stamp"
fi

native_stamp="$STAMPS/native-$(hash_of native/pagemap.c native/build_pagemap.py)"
if [ ! -e "$native_stamp" ] || ! ls vmbeam_kvm/_pagemap*.so >/dev/null 2>&1; then
    step "building native module (cffi)"
    .venv/bin/python native/build_pagemap.py
    touch "$native_stamp"
fi

# The patched QEMU (qemu-patches/): built once per patch series into a cache outside the
# checkout (a fresh clone on this machine reuses it), linked where Settings finds it.
step "patched QEMU (scripts/build-qemu.sh; a cold build takes about 6 minutes on 2 cores)"
qemu_path=$(bash scripts/build-qemu.sh | tail -n 1)
mkdir -p build/qemu
ln -sfn "$qemu_path" build/qemu/qemu-system-x86_64

step "building guest images (incremental)"
make -s -C images/testguest OUT="$PWD/build/images"
make -s -C images/bootdisk OUT="$PWD/build/images"
make -s -C images/linux OUT="$PWD/build/images"
make -s -C images/cloudvm OUT="$PWD/build/images"
make -s -C images/debian OUT="$PWD/build/images"
