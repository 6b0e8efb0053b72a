"""The Linux test guest's disk workload seen from L0: a disk made for it, and the checks that
every record the guest acknowledged is on the disk intact and that its file system is clean.

The guest (``images/linux/diskload.c``) overwrites the 4 KiB blocks of ``/vmbeam-blocks`` on
an ext4 disk with numbered, checksummed records, each written with O_DIRECT and made durable
with fdatasync before it prints ``DISK <serial> ack=<n>``; record ``n`` goes to slot
``n % slots``. The file is made here filled with a fill byte (never a hole), so the guest's
overwrites change no file-system metadata and L0 can read the file from the disk without
replaying the journal, also while the guest runs.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DiskError

BLOCK = 4096
FILE = "vmbeam-blocks"
FILL = 0xA5
MAGIC = b"VMBBLK01"
_FNV_OFFSET, _FNV_PRIME, _M64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    except FileNotFoundError as exc:
        raise DiskError(f"{argv[0]} is missing (Debian: e2fsprogs, qemu-utils)") from exc


def make_disk(path: Path, size: int, *, file_bytes: int = 1 << 20) -> None:
    """A raw disk of ``size`` bytes: ext4 holding ``/vmbeam-blocks`` of ``file_bytes``, every
    byte the fill (the guest's workload runs on any disk that holds that file)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / FILE).write_bytes(bytes([FILL]) * file_bytes)
        path.unlink(missing_ok=True)
        out = _run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-E", "root_owner=0:0",
                    "-d", tmp, str(path), f"{size // 1024}k"])
    if out.returncode != 0:
        raise DiskError(f"mke2fs {path}: {out.stderr.strip()}")


def _fnv(data: bytes) -> int:
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _M64
    return h


def record(seq: int, slots: int) -> bytes:
    """Record ``seq`` exactly as the guest writes it."""
    head = MAGIC + b"".join(v.to_bytes(8, "little") for v in (seq, seq % slots, slots))
    x = (seq * 0x9E3779B97F4A7C15 | 1) & _M64
    words = []
    for _ in range((BLOCK - 8 - len(head)) // 8):
        x ^= (x << 13) & _M64
        x ^= x >> 7
        x ^= (x << 17) & _M64
        words.append(x.to_bytes(8, "little"))
    body = head + b"".join(words)
    return body + _fnv(body).to_bytes(8, "little")


def _seq_of(block: bytes, slot: int, slots: int) -> int | None:
    """The record's seq; 0 for the fill; None for anything else (torn or foreign)."""
    if block == bytes([FILL]) * BLOCK:
        return 0
    if block[:8] != MAGIC:
        return None
    seq = int.from_bytes(block[8:16], "little")
    if seq % slots != slot or block != record(seq, slots):
        return None
    return seq


@dataclass(frozen=True)
class DiskVerdict:
    """What the file held against what the guest acknowledged."""

    slots: int
    acked: int                    # the newest record the guest said was durable
    newest: int                   # the newest record found
    lost: tuple[int, ...]         # acknowledged records missing or damaged (their seq)
    unexpected: tuple[int, ...]   # slots holding a record that should not be there yet
    torn: tuple[int, ...]         # slots holding neither a record of theirs nor the fill

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unexpected

    def __str__(self) -> str:
        return (f"{self.slots} slots, acked {self.acked}, newest {self.newest}, "
                f"lost {list(self.lost)[:8]}, unexpected in slots {list(self.unexpected)[:8]}, "
                f"torn slots {list(self.torn)[:8]}")


def check(data: bytes, acked: int, *, settled: bool) -> DiskVerdict:
    """Every acknowledged record still there: the newest acknowledged record of each slot
    (or, read while the guest runs, a newer one of that slot).

    ``settled``: the guest writes no more (stopped), so every slot holds exactly its newest
    acknowledged record, but for the slot of record ``acked + 1``, in flight when it stopped
    (old, new or torn). Read while the guest runs, one slot may be torn: the block being
    written as it was read."""
    slots = len(data) // BLOCK
    lost: list[int] = []
    unexpected: list[int] = []
    torn: list[int] = []
    newest = 0
    for slot in range(slots):
        got = _seq_of(data[slot * BLOCK:(slot + 1) * BLOCK], slot, slots)
        want = max(acked - (acked - slot) % slots, 0)  # 0: no record of it acknowledged
        if got is None:
            torn.append(slot)
        else:
            newest = max(newest, got)
        if settled and slot == (acked + 1) % slots:
            good = got is None or got in (want, acked + 1)
        elif settled:
            good = got == want
        else:
            good = (got is None and len(torn) == 1) or (got is not None and got >= want)
        if good:
            continue
        if got is not None and got > want:
            unexpected.append(slot)
        elif want > 0:
            lost.append(want)
        else:
            unexpected.append(slot)
    return DiskVerdict(slots, acked, newest, tuple(lost), tuple(unexpected), tuple(torn))


def _as_raw(image: Path, fmt: str, tmp: Path) -> Path:
    """A raw copy of ``image`` (the guest's overlay with its backing, or a raw disk), read
    while a QEMU may hold it (``-U``: its lock stays)."""
    raw = tmp / "disk.raw"
    if fmt == "raw":
        shutil.copyfile(image, raw)
        return raw
    out = _run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(raw)])
    if out.returncode != 0:
        raise DiskError(f"qemu-img convert {image}: {out.stderr.strip()}")
    return raw


def read_file(image: Path, fmt: str = "raw") -> bytes:
    """``/vmbeam-blocks`` as it is on the disk image now."""
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        raw = _as_raw(image, fmt, tmp)
        out = _run(["debugfs", "-R", f"dump /{FILE} {tmp / 'blocks'}", str(raw)])
        if out.returncode != 0 or not (tmp / "blocks").is_file():
            raise DiskError(f"debugfs {image}: {out.stderr.strip()}")
        return (tmp / "blocks").read_bytes()


def fsck(image: Path, fmt: str = "raw") -> tuple[bool, str]:
    """Whether the file system checks clean once its journal is replayed, as the guest's
    kernel would at its next mount (on a copy: the image is not changed); and e2fsck's say."""
    with tempfile.TemporaryDirectory() as t:
        raw = _as_raw(image, fmt, Path(t))
        replay = _run(["e2fsck", "-fy", "-E", "journal_only", str(raw)])
        if replay.returncode > 1:
            return False, replay.stdout + replay.stderr
        out = _run(["e2fsck", "-fn", str(raw)])
        return out.returncode == 0, out.stdout + out.stderr
