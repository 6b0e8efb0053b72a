"""The guests' serial protocol: boot line, fill progress, READY, and heartbeats.

Both guest images (images/testguest, images/linux) print the same lines, so one parser reads
them. A heartbeat carries a sequence number that lives in guest RAM (it continues across a
migration) and the guest's own verdict on its memory pattern (``ok=1`` while every page it
re-verified held the expected content).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

_HB_RE = re.compile(rb"^HB seq=(\d+) round=(\d+) cursor=(\d+) bad=(\d+) ok=([01])\s*$", re.M)
_READY_RE = re.compile(rb"^READY\b", re.M)
_BOOT_RE = re.compile(rb"^VMBEAM-\w+ boot\b", re.M)
# The Linux guest's disk workload (images/linux/diskload.c): record n of the disk with this
# serial is durable (vmbeam_kvm.diskcheck reads the disk against it).
_DISK_ACK_RE = re.compile(rb"^DISK (\S+) ack=(\d+)\s*$", re.M)
_TAIL = 16384


@dataclass(frozen=True)
class Heartbeat:
    """The last heartbeat seen in a serial log."""

    seq: int
    round: int
    cursor: int
    bad: int
    ok: bool


@dataclass(frozen=True)
class SerialStatus:
    """What a guest has said on its serial port so far."""

    booted: bool
    ready: bool
    heartbeat: Heartbeat | None
    disk_acks: dict[str, int] = field(default_factory=dict)  # serial -> newest durable record


def read_status(path: Path, *, ready_known: bool = False) -> SerialStatus:
    """Parse the serial log at ``path`` (only its head and tail are read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_TAIL)
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except FileNotFoundError:
        return SerialStatus(False, ready_known, None)
    hbs = _HB_RE.findall(tail)
    hb = None
    if hbs:
        seq, rnd, cur, bad, ok = hbs[-1]
        hb = Heartbeat(int(seq), int(rnd), int(cur), int(bad), ok == b"1")
    booted = bool(_BOOT_RE.search(head)) or hb is not None or ready_known
    ready = ready_known or bool(_READY_RE.search(head) or _READY_RE.search(tail)) \
        or hb is not None
    acks = {serial.decode(): int(n) for serial, n in _DISK_ACK_RE.findall(tail)}
    return SerialStatus(booted, ready, hb, acks)


async def wait_for_heartbeat(path: Path, *, after_seq: int = -1, timeout: float = 30.0,
                             ready_known: bool = False) -> Heartbeat | None:
    """Wait for a heartbeat with ``seq > after_seq``; None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        hb = read_status(path, ready_known=ready_known).heartbeat
        if hb is not None and hb.seq > after_seq:
            return hb
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.05)
