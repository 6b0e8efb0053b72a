#!/bin/bash
# Proves the nested zero-copy path by hand: host memfd -> ivshmem BAR in cloud
# VM(s) -> RAM of an L2 test guest; see selftest.py for the steps.
# Usage: selftest.sh [--one]   (--one: skip the second cloud VM)
# Env: OUT (default <repo>/build/images), PYTHON (default <repo>/.venv/bin/python).
# Scratch and logs: $OUT/cloudvm/selftest/ (logs and result.json are kept).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${OUT:-$repo/build/images}
py=${PYTHON:-$repo/.venv/bin/python}
work=$out/cloudvm/selftest

make -s -C "$here" OUT="$out"            # no-op when the images are current
rm -rf "$work"
mkdir -p "$work/src"

# Whatever happens, no QEMU we started survives us: selftest.py kills them in
# its finally-clause; this catches the case where Python itself was killed.
cleanup() {
    set +e                                # best effort: do every step
    local f pid
    [ -n "${pypid:-}" ] && kill "$pypid" 2>/dev/null && wait "$pypid" 2>/dev/null
    for f in "$work"/*.pid; do
        [ -e "$f" ] || continue
        pid=$(cat "$f")
        # Only if that pid still is one of our QEMUs (pids get reused).
        if grep -qs "$work" "/proc/$pid/cmdline"; then kill -9 "$pid"; fi
        rm -f "$f"
    done
    rm -rf "$work/src" "$work/src.ext4" "$work"/*.qmp "$work"/*.agent
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The source disk: the test agent as start-agent, and the L2 test guest.
install -m 755 "$here/testagent.py" "$work/src/start-agent"
cp "$out/testguest.bin" "$work/src/"
"$here/mksrc.sh" "$work/src.ext4" "$work/src"

# In the background + wait, so a signal reaches the trap at once.
"$py" "$here/selftest.py" --out "$out" --work "$work" "$@" &
pypid=$!
wait "$pypid"                            # its status is ours (set -e)
pypid=
