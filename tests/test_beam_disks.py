"""Beam disks: a guest's disks in cloud VMs, moved between them without a byte copied.

The disk is L0's file (a qcow2 overlay over the user's file), hot-plugged into the cloud
VM the guest runs in; a move plugs the same file into the destination, the two L2 QEMUs
hand it over, and relocate unplugs it from the source on L0. What is checked is asked of
L0's QEMUs and files, not the store: which cloud VM's QEMU holds an fd of the file (and
QEMU's image lock on it), its block nodes, and the image read back whole from L0 after a
flush by the L2 that runs the guest, against every write that was acknowledged.

Writes are HMP ``qemu-io`` on the L2's virtio-blk device (through the agent), as in
``test_disks.py``: the BlockBackend the guest's own writes take, acknowledged when the
command returns. One lab for the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vmbeam_kvm import Host, MigrationError
from vmbeam_kvm.agent.protocol import AgentClient
from vmbeam_kvm.disks import loads, lock_bytes
from vmbeam_kvm.migrate.faults import injected
from vmbeam_kvm.store import GuestState

from .conftest import assert_same_bytes, cli, qemu_pids, run_cli, settings_of

MiB = 1 << 20
DISK = 16 * MiB
VMS = ("l1a", "l1b")


def make_user_disk(path: Path) -> str:
    """A user's qcow2 disk whose first MiB holds 0xa5 (written before any guest runs)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(DISK)
        f.write(b"\xa5" * MiB)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True)
    raw.unlink()
    return str(path)


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def holders(host: Host, path: str) -> list[str]:
    """The cloud VMs whose QEMU on L0 holds an fd of ``path`` (L0's /proc, not the store)."""
    real = os.path.realpath(path)
    out = []
    for vm in host.store.cloud_vms():
        fds = Path(f"/proc/{vm.pid}/fd")
        with_fd = False
        for fd in fds.iterdir() if fds.exists() else []:
            try:
                with_fd |= os.readlink(fd) == real
            except OSError:
                continue
        if with_fd:
            out.append(vm.name)
    return sorted(out)


async def disk_nodes(host: Host, vm: str) -> list[str]:
    """The beam-disk block nodes cloud VM ``vm``'s QEMU has (asked of that QEMU)."""
    nodes = await host.cloud.l1(host.cloud.vm(vm)).execute("query-named-block-nodes",
                                                            {"flat": True})
    return sorted(n["node-name"] for n in nodes if n["node-name"].startswith("bd-"))


class Contents:
    """What the guest's disk must hold: the user's bytes plus every acknowledged write."""

    def __init__(self, host: Host, name: str, index: int = 0) -> None:
        self.host, self.name, self.index = host, name, index
        self.data = bytearray(DISK)
        self.data[:MiB] = b"\xa5" * MiB

    async def io(self, cmd: str) -> None:
        rec = self.host.store.get_guest(self.name)
        await self.host.cloud.qmp(rec, "human-monitor-command", {
            "command-line": f'qemu-io -d disk{self.index}-dev/virtio-backend "{cmd}"'})

    async def write(self, pattern: int, offset: int) -> None:
        await self.io(f"write -P {pattern:#x} {offset} 64k")
        self.data[offset:offset + 65536] = bytes([pattern]) * 65536

    async def check(self, tmp: Path) -> None:
        """Read whole from L0 after a flush by the L2 that runs the guest."""
        await self.io("flush")
        overlay = loads(self.host.store.get_guest(self.name).disks)[self.index].path
        out = tmp / "read-back.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", overlay, str(out)],
                       check=True)
        got = out.read_bytes()
        out.unlink()
        assert_same_bytes(got, self.data)


async def check_plugged_only_where_it_runs(host: Host, name: str) -> None:
    """Each disk's overlay and its backing (the user's file) are held by the QEMU of the
    cloud VM the guest runs in, by no other (fds, block nodes, image locks); only that one
    may write the overlay, nobody the user's file."""
    rec = host.store.get_guest(name)
    disks = loads(rec.disks)
    for d in disks:
        assert holders(host, d.path) == [rec.cloud_vm]
        assert holders(host, d.user_file) == [rec.cloud_vm]
    for vm in VMS:
        nodes = await disk_nodes(host, vm)
        assert len(nodes) == (2 * len(disks) if vm == rec.cloud_vm else 0), (vm, nodes)
        pid = host.store.get_cloud_vm(vm).pid
        for d in disks:
            assert (101 in lock_bytes(Path(d.path), pid)) == (vm == rec.cloud_vm)
            assert 101 not in lock_bytes(Path(d.user_file), pid)


@pytest.fixture
async def lab_host(lab: dict[str, Any]) -> AsyncIterator[Host]:
    async with Host(settings_of(lab)) as host:
        yield host


@pytest.fixture
async def disk_guest(lab: dict[str, Any], lab_host: Host, tmp_path: Path
                     ) -> AsyncIterator[tuple[str, str]]:
    """A 2-vCPU test guest in l1a with one beam disk (started by the CLI)."""
    user = make_user_disk(tmp_path / "user.qcow2")
    await lab_host.disconnect()
    st = cli(lab, "guest", "start", "bd", "--cloud-vm", "l1a", "--memory", "64M",
             "--image", "test", "--touch", "50", "--cpus", "2", "--disk", user)
    assert st["cloud_vm"] == "l1a" and st["cpus"] == 2
    (d,) = st["disks"]
    assert d["mode"] == "overlay" and d["backing"] == user and d["serial"] == "vmbeam-0"
    try:
        yield "bd", user
    finally:
        await lab_host.disconnect()
        await lab_host.recover()
        await lab_host.stop_guest("bd", missing_ok=True)
        assert holders(lab_host, user) == []
        for vm in VMS:
            assert await disk_nodes(lab_host, vm) == []
            assert lab_host.store.get_cloud_vm(vm).disks() == {}
        assert not (lab_host.store.state_dir / "guests" / "bd").exists()  # its overlay too


async def test_beam_disk_moves_there_and_back_without_a_copy(
        lab: dict[str, Any], lab_host: Host, disk_guest: tuple[str, str], tmp_path: Path
        ) -> None:
    name, user = disk_guest
    host = lab_host
    before = digest(user)
    disk = Contents(host, name)
    await disk.check(tmp_path)  # the user's bytes, through the overlay, in the L2
    await check_plugged_only_where_it_runs(host, name)
    await disk.write(0x11, 2 * MiB)
    for n, dst in enumerate(("l1b", "l1a", "l1b")):
        res = await host.cloud.migrate(name, dst)
        assert res.guest_ok is True and res.mode == "zero-copy"
        assert res.disks == [{"id": "disk0", "mode": "shared", "bytes_copied": 0}]
        assert res.disk_bytes_copied == 0 and res.ram_transferred_bytes < MiB
        assert res.source_disks_revoked_ms is not None
        assert host.store.get_guest(name).cloud_vm == dst
        await check_plugged_only_where_it_runs(host, name)
        await disk.check(tmp_path)  # every write acknowledged before the move
        await disk.write(0x20 + n, (3 + n) * MiB)
        await disk.check(tmp_path)
        assert len(await host.cloud.qmp(host.store.get_guest(name), "query-cpus-fast")) == 2
    assert digest(user) == before  # the user's file was never written
    await host.disconnect()
    st = cli(lab, "guest", "status", name)
    assert [d["id"] for d in st["disks"]] == ["disk0"] and st["cloud_vm"] == "l1b"
    vms = {v["name"]: v for v in cli(lab, "cloud-vm", "list")}
    overlay = loads(host.store.get_guest(name).disks)[0].path
    assert vms["l1b"]["disks"] == sorted([overlay, user]) and vms["l1a"]["disks"] == []


def seed_file(seed: Path, name: str) -> str:
    """A file of a NoCloud seed, read with mtools (no mount)."""
    return subprocess.run(["mtype", "-i", str(seed), f"::{name}"], capture_output=True,
                          text=True, check=True).stdout


async def test_guest_booted_from_its_qcow2_moves_there_and_back(
        lab: dict[str, Any], lab_host: Host, tmp_path: Path) -> None:
    """A guest as a user brings it: booted from their qcow2 through firmware (SeaBIOS,
    SYSLINUX, the test guest on that disk), a data disk, 2 vCPUs, a NIC on the lab network
    and a cloud-init seed (its lab address in the network config); l1a -> l1b -> l1a
    zero-copy with 0 disk bytes copied, every acknowledged write intact, each disk plugged
    only where the guest runs, the user's files unchanged. The
    firmware reads the disk by DMA into the L2's RAM (a mapping of /dev/mem): with O_DIRECT
    in the L2 that read failed and the guest never booted (docs/design.md §11)."""
    host = lab_host
    boot = tmp_path / "boot.qcow2"
    shutil.copyfile(host.settings.images_dir / "testguest-disk.qcow2", boot)
    data = make_user_disk(tmp_path / "data.qcow2")
    sums = digest(str(boot)), digest(data)
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\nwrite_files: [{path: /etc/vmbeam, content: hi}]\n")
    await host.disconnect()
    st = cli(lab, "guest", "start", "fw", "--cloud-vm", "l1a", "--memory", "64M",
             "--cpus", "2", "--net", "--disk", str(boot), "--disk", data,
             "--cloud-init", str(user_data), timeout=600)
    try:
        assert st["image"] == "disk" and st["cpus"] == 2 and st["ip"]
        seed = host.store.guest_dir("fw") / "seed.raw"
        assert [d["backing"] for d in st["disks"]] == [str(boot), data, str(seed)]
        mac = host.cloud.nic_args(host.store.get_guest("fw"))["mac"]
        assert seed_file(seed, "user-data") == user_data.read_text()
        assert "local-hostname: fw" in seed_file(seed, "meta-data")
        net = json.loads(seed_file(seed, "network-config"))["ethernets"]["lab0"]
        assert net["addresses"] == [st["ip"]] and net["match"]["macaddress"] == mac
        seed_sum = digest(str(seed))
        hb = await host.cloud.wait_heartbeat(host.store.get_guest("fw"), timeout=600)
        assert hb is not None and hb.ok  # the test guest SYSLINUX loaded from the disk
        disk = Contents(host, "fw", index=1)
        await check_plugged_only_where_it_runs(host, "fw")
        for n, dst in enumerate(("l1b", "l1a")):
            await disk.write(0x70 + n, (2 + n) * MiB)
            res = await host.cloud.migrate("fw", dst)
            assert res.guest_ok is True and res.mode == "zero-copy"
            assert res.disks == [{"id": f"disk{i}", "mode": "shared", "bytes_copied": 0}
                                 for i in (0, 1, 2)]
            assert res.disk_bytes_copied == 0 and res.ram_transferred_bytes < MiB
            await check_plugged_only_where_it_runs(host, "fw")
            await disk.check(tmp_path)
            rec = host.store.get_guest("fw")
            assert len(await host.cloud.qmp(rec, "query-cpus-fast")) == 2
            (nic,) = await host.cloud.qmp(rec, "query-rx-filter")
            assert nic["main-mac"] == mac
        assert (await host.status("fw")).memory_ok is True
        assert digest(str(seed)) == seed_sum  # behind its overlay, as the user's files
    finally:
        await host.disconnect()
        await host.stop_guest("fw", missing_ok=True)
    assert (digest(str(boot)), digest(data)) == sums
    assert not host.store.state_dir.joinpath("guests", "fw").exists()  # the seed went too
    for vm in VMS:
        assert await disk_nodes(host, vm) == []


async def test_relocate_revokes_a_paused_sources_disk(
        lab_host: Host, disk_guest: tuple[str, str], tmp_path: Path) -> None:
    """A source cloud VM paused between switch and relocate (it can neither eject nor
    answer) loses the disk at once on L0: its QEMU holds no fd of the file, no lock, no
    node; continued, it runs on, and the guest moves back into it with its disk intact."""
    name, user = disk_guest
    host = lab_host
    disk = Contents(host, name)
    await disk.write(0x31, 2 * MiB)
    l1a = host.cloud.l1(host.cloud.vm("l1a"))
    overlay = loads(host.store.get_guest(name).disks)[0].path
    assert holders(host, overlay) == ["l1a"]

    async def pause_source(_dst: AgentClient) -> None:
        await l1a.execute("stop")
        # Between the switch and relocate both cloud VMs hold the file (share-rw).
        assert holders(host, overlay) == ["l1a", "l1b"]

    try:
        with injected(after_switch=pause_source):
            res = await host.cloud.migrate(name, "l1b")
        assert await l1a.run_state() == "paused"  # it stayed paused throughout
        assert res.guest_ok is True and res.source_disks_revoked_ms is not None
        assert holders(host, overlay) == ["l1b"] and holders(host, user) == ["l1b"]
        assert lock_bytes(Path(overlay), l1a.pid) == set()
        assert await disk_nodes(host, "l1a") == []
        await disk.write(0x32, 3 * MiB)  # the destination writes while l1a is paused
    finally:
        await l1a.execute("cont")
    await disk.check(tmp_path)
    back = await host.cloud.migrate(name, "l1a")
    assert back.guest_ok is True and back.disk_bytes_copied == 0
    await check_plugged_only_where_it_runs(host, name)
    await disk.write(0x33, 4 * MiB)
    await disk.check(tmp_path)


async def _dest_dies_before_switch(host: Host, name: str, dst: str) -> None:
    async def kill_dest(agent: AgentClient) -> None:
        await agent.signal(name, 9)

    with injected(before_switch=kill_dest), pytest.raises(MigrationError) as err:
        await host.cloud.migrate(name, dst)
    assert err.value.exit_code == 3 and err.value.source_resumed is True


async def test_failed_moves_keep_the_disk_with_the_source(
        lab: dict[str, Any], lab_host: Host, disk_guest: tuple[str, str], tmp_path: Path
        ) -> None:
    """The fault cells of the disk axis, on a guest fresh, moved and moved back: the
    destination's L2 killed during prepare, the command killed after prepare (journaled)
    and after the switch. No acknowledged write is lost, the disk stays plugged only where
    the guest runs, and the guest moves again."""
    name, _user = disk_guest
    host = lab_host
    disk = Contents(host, name)
    for history in ("fresh", "moved", "moved-back"):
        src = host.store.get_guest(name).cloud_vm
        dst = "l1b" if src == "l1a" else "l1a"
        pattern = {"fresh": 0x40, "moved": 0x50, "moved-back": 0x60}[history]
        await disk.write(pattern, 2 * MiB)
        # The destination dies before the switch: the source keeps the guest and its disk.
        await _dest_dies_before_switch(host, name, dst)
        assert host.store.get_guest(name).cloud_vm == src, history
        await check_plugged_only_where_it_runs(host, name)
        await disk.write(pattern + 1, 3 * MiB)
        await disk.check(tmp_path)
        # The command dies after prepare: the next command drops the destination; after
        # the switch: the next command keeps it.
        for when, where in (("prepare", src), ("switch", dst)):
            await host.disconnect()
            proc = run_cli(lab["state"], "migrate", name, "--to", dst, "--json",
                           env={**lab["env"], "VMBEAM_TEST_CRASH_AFTER": when})
            assert proc.returncode == 99, proc.stderr
            await host.recover()
            rec = host.store.get_guest(name)
            assert rec.cloud_vm == where and rec.state is GuestState.RUNNING, (history, when)
            await check_plugged_only_where_it_runs(host, name)
            await disk.check(tmp_path)
        await disk.write(pattern + 2, 4 * MiB)
        # ...and it moves again: this move makes the next history.
        res = await host.cloud.migrate(name, src)
        assert res.guest_ok is True and res.disk_bytes_copied == 0, history
        await check_plugged_only_where_it_runs(host, name)
        await disk.check(tmp_path)
    assert qemu_pids(f"guests/{name}") == []  # no QEMU on L0 of the guest's own


def test_precopy_of_a_beam_disk_guest_is_refused(lab: dict[str, Any],
                                                 disk_guest: tuple[str, str]) -> None:
    name, _user = disk_guest
    proc = run_cli(lab["state"], "migrate", name, "--to", "l1b", "--mode", "precopy",
                   env=lab["env"])
    assert proc.returncode == 2 and "zero-copy" in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if "error" in ln] == [
        proc.stderr.strip().splitlines()[-1]]  # one line says why
    assert cli(lab, "guest", "status", name)["cloud_vm"] == "l1a"  # nothing changed


def test_disk_start_refusals_change_nothing(lab: dict[str, Any], tmp_path: Path) -> None:
    missing = run_cli(lab["state"], "guest", "start", "bx", "--cloud-vm", "l1a", "--memory",
                      "64M", "--disk", str(tmp_path / "nope.qcow2"), env=lab["env"])
    assert missing.returncode == 2 and "is not a file" in missing.stderr
    # A qcow2 written in place could not grow past the block device it is plugged as.
    user = make_user_disk(tmp_path / "inplace.qcow2")
    before = digest(user)
    in_place = run_cli(lab["state"], "guest", "start", "bx", "--cloud-vm", "l1a", "--memory",
                       "64M", "--disk", user, "--disk-in-place", env=lab["env"])
    assert in_place.returncode == 2 and "must be raw" in in_place.stderr
    assert len([ln for ln in in_place.stderr.splitlines() if "error" in ln]) == 1
    assert digest(user) == before
    assert cli(lab, "guest", "list") == []
    vms = {v["name"]: v for v in cli(lab, "cloud-vm", "list")}
    assert vms["l1a"]["disks"] == [] and vms["l1a"]["regions"] == []
