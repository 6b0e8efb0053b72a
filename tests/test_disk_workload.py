"""The Linux guest's disk workload on this host: its kernel writes numbered, checksummed
blocks with O_DIRECT and fdatasync and says which are durable (images/linux/diskload.c);
after moves, faults and stops every acknowledged block must be on the disk, read by L0
(vmbeam_kvm.diskcheck), and its file system must check clean.

A disk is read while the guest runs only after its newest acknowledgement was seen, so
every block it names is durable by then; a *settled* check pauses the guest first (or
reads a disk nobody runs), so the disk must hold exactly the acknowledged blocks, but for
the one in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vmbeam_kvm import Guest, Host, MigrationMode, MigrationOptions, VmbeamError, diskcheck
from vmbeam_kvm.disks import writers
from vmbeam_kvm.heartbeat import read_status
from vmbeam_kvm.migrate.faults import injected
from vmbeam_kvm.qemu.process import QemuProcess
from vmbeam_kvm.store import GuestState

from .conftest import qemu_pids

ZC, PC = MigrationMode.ZERO_COPY, MigrationMode.PRECOPY
MiB = 1 << 20
SERIAL = "vmbeam-0"


def acked(g: Guest) -> int:
    """The newest block the guest said is durable, over every QEMU it ran in (a destination
    that ran it before it was killed said so on its own serial port)."""
    logs = Path(g.record.serial_path).parent.glob("serial-*.log")
    return max((read_status(p).disk_acks.get(SERIAL, 0) for p in logs), default=0)


async def wait_acks(g: Guest, more_than: int, timeout: float = 60) -> int:
    """Wait until the workload acknowledged a block newer than ``more_than``."""
    for _ in range(int(timeout * 10)):
        n = acked(g)
        if n > more_than:
            return n
        await asyncio.sleep(0.1)
    raise AssertionError(f"the disk workload made no block durable after {more_than}")


def disk_of(g: Guest) -> tuple[Path, str]:
    (d,) = (g.host.local.spec_of(g.record).disks if isinstance(g.host, Host) else ())
    return Path(d.path), d.format


async def check_live(g: Guest) -> int:
    """Read the disk while the guest writes it: every block acknowledged before is there."""
    n = acked(g)
    path, fmt = disk_of(g)
    verdict = diskcheck.check(diskcheck.read_file(path, fmt), n, settled=False)
    assert verdict.ok, verdict
    return n


async def check_settled(g: Guest, proc: QemuProcess | None = None) -> int:
    """Pause the guest and check that its disk holds exactly what it acknowledged."""
    qemu = proc or g.host.process(g.record)  # type: ignore[attr-defined]
    await qemu.execute("stop")
    try:
        await asyncio.sleep(0.2)  # a line the guest printed reaches the log file
        n = acked(g)
        await qemu.execute("human-monitor-command", {"command-line": "qemu-io -d "
                           "disk0-dev/virtio-backend flush"})
        path, fmt = disk_of(g)
        verdict = diskcheck.check(diskcheck.read_file(path, fmt), n, settled=True)
        assert verdict.ok, verdict
        return n
    finally:
        await qemu.execute("cont")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
async def wl_guest(host: Host, tmp_path: Path, request: pytest.FixtureRequest
                   ) -> AsyncIterator[tuple[Guest, Path]]:
    in_place = getattr(request, "param", False)
    user = tmp_path / "wl.raw"
    diskcheck.make_disk(user, 32 * MiB)
    async with await host.start_guest("wl", "256M", image="linux", touch=20, disks=[str(user)],
                                      disk_in_place=in_place, cpus=2) as g:
        await g.wait_ready(timeout=120)
        await wait_acks(g, 20)
        yield g, user


def test_the_check_finds_what_is_lost(tmp_path: Path) -> None:
    """The checker itself: a lost, a stale and an unacknowledged block are each found."""
    disk = tmp_path / "d.raw"
    diskcheck.make_disk(disk, 8 * MiB, file_bytes=64 * 4096)
    data = bytearray(diskcheck.read_file(disk))
    slots = len(data) // 4096
    assert slots == 64 and diskcheck.check(bytes(data), 0, settled=True).ok
    for seq in range(1, 101):
        k = seq % slots
        data[k * 4096:(k + 1) * 4096] = diskcheck.record(seq, slots)
    assert diskcheck.check(bytes(data), 100, settled=True).ok
    assert diskcheck.check(bytes(data), 99, settled=True).ok  # 100 was in flight
    assert not diskcheck.check(bytes(data), 98, settled=True).ok  # 100: never acknowledged
    assert diskcheck.check(bytes(data), 60, settled=False).ok  # read as 61.. were written
    stale = bytearray(data)
    stale[(90 % 64) * 4096:(90 % 64 + 1) * 4096] = diskcheck.record(26, slots)
    v = diskcheck.check(bytes(stale), 100, settled=True)
    assert v.lost == (90,) and not v.ok
    torn = bytearray(data)
    torn[5 * 4096 + 100] ^= 1
    v = diskcheck.check(bytes(torn), 100, settled=True)
    assert v.lost == (69,) and v.torn == (5,)
    assert diskcheck.check(bytes(torn), 100, settled=False).ok
    torn[6 * 4096] ^= 1
    assert not diskcheck.check(bytes(torn), 100, settled=False).ok  # two torn: never


async def test_workload_moves_by_every_method(wl_guest: tuple[Guest, Path]) -> None:
    """Zero-copy, precopy, zero-copy: the workload goes on across each move, and every block
    acknowledged is on the disk after each; the user's file is never written."""
    g, user = wl_guest
    before = digest(user)
    assert (await g.status()).disk_acks[SERIAL] > 0
    n = await check_settled(g)
    for mode in (ZC, PC, ZC):
        res = await g.migrate(MigrationOptions(mode=mode))
        assert res.guest_ok
        assert res.disk_bytes_copied == 0 if mode is ZC else res.disk_bytes_copied > 0
        n = await wait_acks(g, max(n, acked(g)))  # it writes on in the new QEMU
        await check_live(g)
        n = await check_settled(g)
    assert (await g.status()).heartbeat.ok  # type: ignore[union-attr]
    assert digest(user) == before


@pytest.mark.parametrize("wl_guest", [True], indirect=True)
async def test_workload_survives_the_stop(host: Host, wl_guest: tuple[Guest, Path]) -> None:
    """In place: the guest stops (its QEMU quits, the file system not unmounted) after a
    move; the file holds every acknowledged block, checks clean after its journal replays,
    and a new guest on it finds them all itself."""
    g, user = wl_guest
    assert (await g.migrate(MigrationOptions(mode=ZC))).guest_ok
    await wait_acks(g, acked(g))
    await g.qmp("stop")
    await asyncio.sleep(0.2)
    n = acked(g)
    await g.stop()
    verdict = diskcheck.check(diskcheck.read_file(user), n, settled=True)
    assert verdict.ok, verdict
    clean, say = diskcheck.fsck(user)
    assert clean, say
    async with await host.start_guest("wl2", "256M", image="linux", touch=20,
                                      disks=[str(user)], disk_in_place=True) as g2:
        await g2.wait_ready(timeout=120)
        await wait_acks(g2, n)  # it went on from the newest block it found
        scan = re.search(rb"DISK vmbeam-0 scan slots=(\d+) valid=(\d+) torn=(\d+) last=(\d+)",
                         Path(g2.record.serial_path).read_bytes())
        assert scan is not None
        slots, valid, torn, last = (int(x) for x in scan.groups())
        assert torn <= 1 and last in (n, n + 1) and valid == min(slots, last) - (torn > 0)


# -- the workload's cells of the fault matrix (flat) -----------------------------------------
async def kill_dst(dst: QemuProcess) -> None:
    os.kill(dst.pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", [ZC, PC], ids=["zero-copy", "precopy"])
async def test_destination_dies_before_the_switch(wl_guest: tuple[Guest, Path],
                                                  mode: MigrationMode) -> None:
    """The destination killed at prepare, on the guest fresh, moved and moved again: the move
    fails (exit 3), the source runs on and its disk holds every acknowledged block; the
    guest then moves."""
    g, _ = wl_guest
    for history in ("fresh", "moved", "moved-again"):
        src = g.record.pid
        with injected(before_switch=kill_dst), pytest.raises(VmbeamError) as exc:
            await g.migrate(MigrationOptions(mode=mode))
        assert exc.value.exit_code == 3, history
        assert g.record.state is GuestState.RUNNING and g.record.pid == src
        assert qemu_pids(str(g.host.settings.state_dir)) == [src]
        await wait_acks(g, acked(g))  # the source writes on
        await check_settled(g)
        res = await g.migrate(MigrationOptions(mode=PC if history == "fresh" else ZC))
        assert res.guest_ok, history
        await wait_acks(g, acked(g))
        await check_live(g)


@pytest.mark.parametrize("mode", [ZC, PC], ids=["zero-copy", "precopy"])
@pytest.mark.parametrize("history", ["fresh", "moved", "moved-back"])
async def test_destination_dies_after_the_switch(wl_guest: tuple[Guest, Path],
                                                 mode: MigrationMode, history: str) -> None:
    """The destination killed right after the switch: held for an operator (exit 4), the
    source paused and writing nothing; the disk holds every block acknowledged by either
    QEMU, nothing else but the one in flight, and nobody holds its write lock."""
    g, _ = wl_guest
    if history != "fresh":
        assert (await g.migrate(MigrationOptions(mode=PC))).guest_ok
    if history == "moved-back":
        assert (await g.migrate(MigrationOptions(mode=ZC))).guest_ok
    await wait_acks(g, acked(g))
    path, fmt = disk_of(g)
    with injected(after_switch=kill_dst), pytest.raises(VmbeamError) as exc:
        await g.migrate(MigrationOptions(mode=mode))
    assert exc.value.exit_code == 4 and g.record.state is GuestState.NEEDS_ACTION
    pids = qemu_pids(str(g.host.settings.state_dir))
    assert pids == [g.record.pid] and writers(path, pids) == []
    await asyncio.sleep(0.5)  # were the source to write, it would now
    verdict = diskcheck.check(diskcheck.read_file(path, fmt), acked(g), settled=True)
    assert verdict.ok, verdict
    clean, say = diskcheck.fsck(path, fmt)
    assert clean, say
