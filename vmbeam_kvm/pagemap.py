"""Physical proof of sharing: do two QEMU processes map a guest's RAM on the same frames?

Reads ``/proc/PID/maps`` to find each process's mapping of the beam region (by inode) and
compares their ``/proc/PID/pagemap`` entries with the native helper in ``native/pagemap.c``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import RegionError


@dataclass(frozen=True)
class FrameComparison:
    """Pages of a guest's RAM resident in each process and how many share a frame."""

    pages: int
    present_a: int
    present_b: int
    both: int
    same: int

    @property
    def ratio(self) -> float | None:
        """Fraction of pages resident in both that map the same frame (None if none are)."""
        return self.same / self.both if self.both else None


def find_mapping(pid: int, inode: int, size: int) -> int:
    """Return the start address of ``pid``'s mapping of the file ``inode`` covering ``size``."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 5 or int(fields[4]) != inode or int(fields[2], 16) != 0:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start >= size:
                return start
    raise RegionError(f"process {pid} has no mapping of region inode {inode}")


def compare_frames(pid_a: int, pid_b: int, inode: int, size: int) -> FrameComparison:
    """Compare the frames behind the region ``inode`` (``size`` bytes) in two processes."""
    from . import _pagemap  # type: ignore[attr-defined]  # built by native/build_pagemap.py

    addr_a = find_mapping(pid_a, inode, size)
    addr_b = find_mapping(pid_b, inode, size)
    npages = size // 4096
    fd_a = os.open(f"/proc/{pid_a}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd_b = os.open(f"/proc/{pid_b}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            out = _pagemap.ffi.new("uint64_t[4]")
            rc = _pagemap.lib.vmbeam_compare_pagemaps(fd_a, addr_a, fd_b, addr_b, npages, out)
        finally:
            os.close(fd_b)
    finally:
        os.close(fd_a)
    if rc < 0:
        raise RegionError(f"reading pagemap failed: {os.strerror(-rc)}")
    return FrameComparison(npages, int(out[0]), int(out[1]), int(out[2]), int(out[3]))


def find_memfd_inode(pid: int, size: int) -> int:
    """Inode of the memfd that ``pid`` maps as guest RAM of ``size`` bytes (QEMU's own memfd)."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or "memfd:" not in fields[5]:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start >= size:
                return int(fields[4])
    raise RegionError(f"process {pid} maps no memfd of {size} bytes")
