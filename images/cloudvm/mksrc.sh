#!/bin/bash
# Makes the small read-only "source" disk a cloud VM mounts at /opt/vmbeam:
#   mksrc.sh OUT.ext4 DIR      (ext4, label VMBEAMSRC, size = content + 16 MB)
# DIR typically holds the project's Python sources, the agent, guest images and
# an executable `start-agent`, which the L1's init keeps running.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 OUT.ext4 DIR" >&2; exit 2; }
out=$1 dir=$2
[ -d "$dir" ] || { echo "mksrc: $dir is not a directory" >&2; exit 2; }
# Apparent size plus a per-file allowance for inodes/blocks rounding, + 16 MB.
kb=$(du -sk --apparent-size "$dir" | cut -f1)
files=$(find "$dir" | wc -l)
mb=$(( (kb + files * 4) / 1024 + 16 ))
rm -f "$out.tmp"
truncate -s "${mb}M" "$out.tmp"
# -E root_owner: the mount point's owner is root, whoever runs this.
mkfs.ext4 -q -F -L VMBEAMSRC -m 0 -E root_owner=0:0 -d "$dir" "$out.tmp"
mv "$out.tmp" "$out"
