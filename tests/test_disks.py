"""Guests with disks on this host (``guest start --disk``), moved by every flat method.

What is checked is asked of the QEMUs and the files, not the store: the data through the
QEMU that runs the guest, the image locks (``/proc``: who holds QEMU's write permission on
which file), the user's file byte for byte.

Data is written with HMP ``qemu-io`` on the guest's virtio-blk device
(``disk<n>-dev/virtio-backend``): the BlockBackend the guest's own writes take (above a
precopy's mirror filter), acknowledged when the command returns. It is read back whole from
the host after a flush by the QEMU that runs the guest then, and compared with every write
made. The test guest has no block driver of its own; a Linux guest writing through its
kernel would exercise the same block layer at many times the cost under TCG, so this is the
cheap honest option.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vmbeam_kvm import Guest, Host, MigrationMode, MigrationOptions, VmbeamError
from vmbeam_kvm.disks import lock_bytes, writers
from vmbeam_kvm.migrate.faults import injected
from vmbeam_kvm.qemu.machine import RamBackend, build_argv
from vmbeam_kvm.qemu.process import QemuProcess
from vmbeam_kvm.store import GuestState

from .conftest import assert_same_bytes, qemu_pids, run_cli

ZC, PC, CPR = MigrationMode.ZERO_COPY, MigrationMode.PRECOPY, MigrationMode.CPR_TRANSFER
MiB = 1 << 20
DISK = 16 * MiB


def make_user_disk(path: Path, fmt: str = "raw") -> str:
    """A user's disk whose first MiB the host wrote before the guest starts (0xa5)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(DISK)
        f.write(b"\xa5" * MiB)
    if fmt == "raw":
        return str(raw)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw),
                    str(path)], check=True)
    raw.unlink()
    return str(path)


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


async def hmp_io(g: Guest, disk: str, cmd: str) -> None:
    """A qemu-io command on the guest's virtio-blk device (HMP prints its output on QEMU's
    stdout, not in the reply: what it did is checked from the image afterwards)."""
    # Straight to the QEMU: also one held paused for an operator (Guest.qmp refuses those).
    await local_host(g).process(g.record).execute(
        "human-monitor-command",
        {"command-line": f'qemu-io -d {disk}-dev/virtio-backend "{cmd}"'})


class Contents:
    """What the guest's disk must hold: the host's bytes plus every acknowledged write."""

    def __init__(self) -> None:
        self.data = bytearray(DISK)
        self.data[:MiB] = b"\xa5" * MiB

    async def write(self, g: Guest, pattern: int, offset: int, disk: str = "disk0") -> None:
        await hmp_io(g, disk, f"write -P {pattern:#x} {offset} 64k")
        self.data[offset:offset + 65536] = bytes([pattern]) * 65536

    async def check(self, g: Guest, tmp: Path, disk: int = 0) -> None:
        """The image the running QEMU writes, read whole from the host after a flush by that
        QEMU, holds exactly what was written (qcow2 chain followed to the user's file)."""
        await hmp_io(g, f"disk{disk}", "flush")
        out = tmp / "read-back.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", disk_files(g)[disk],
                        str(out)], check=True)
        got = out.read_bytes()
        out.unlink()
        assert_same_bytes(got, self.data)


def disk_files(g: Guest) -> list[str]:
    return [d.path for d in local_host(g).local.spec_of(g.record).disks]


def local_host(g: Guest) -> Host:
    assert isinstance(g.host, Host)
    return g.host


def check_sole_writer(g: Guest, user_file: str | None = None) -> None:
    """Only the QEMU that runs the guest may write its disk; the user's file nobody."""
    pids = qemu_pids(str(g.host.settings.state_dir))
    for path in disk_files(g):
        assert writers(Path(path), pids) == [g.record.pid], (path, pids)
    if user_file is not None and user_file not in disk_files(g):
        assert writers(Path(user_file), pids) == []
        assert 101 not in lock_bytes(Path(user_file))


@pytest.fixture
async def disk_guest(host: Host, tmp_path: Path, request: pytest.FixtureRequest
                     ) -> AsyncIterator[tuple[Guest, str]]:
    backend = getattr(request, "param", RamBackend.REGION)
    user = make_user_disk(tmp_path / "user.qcow2", "qcow2")
    async with await host.start_guest("dg", "64M", image="test", touch=50, disks=[user],
                                      backend=backend) as g:
        await g.wait_ready(timeout=60)
        yield g, user


async def test_disk_moves_by_every_method(disk_guest: tuple[Guest, str]) -> None:
    """Zero-copy shares the file, precopy copies it (also the writes made while it does),
    and nothing acknowledged is lost; the user's file is never written."""
    g, user = disk_guest
    tmp = Path(user).parent
    disk = Contents()
    before = digest(user)
    (st,) = (await g.status()).disks
    assert st["mode"] == "overlay" and st["backing"] == user and st["format"] == "qcow2"
    assert st["serial"] == "vmbeam-0" and st["user_format"] == "qcow2"
    blk = await g.qmp("query-block")
    assert [b["inserted"]["node-name"] for b in blk if b.get("inserted")] == ["disk0"]
    await disk.check(g, tmp)  # the host's bytes, through the overlay
    check_sole_writer(g, user)
    await disk.write(g, 0x11, 2 * MiB)

    res = await g.migrate(MigrationOptions(mode=ZC))
    assert res.guest_ok and res.disks == [{"id": "disk0", "mode": "shared",
                                           "bytes_copied": 0}]
    assert res.disk_bytes_copied == 0
    check_sole_writer(g, user)
    await disk.check(g, tmp)
    await disk.write(g, 0x22, 3 * MiB)

    async def during_the_copy(dst: QemuProcess) -> None:
        # The mirror is in step; a write now must reach the copy too (write-blocking).
        await disk.write(g, 0x33, 4 * MiB)
    old = disk_files(g)
    with injected(before_switch=during_the_copy):
        res = await g.migrate(MigrationOptions(mode=PC))
    assert res.guest_ok and res.disks[0]["mode"] == "copied"
    # Only the guest's writes are copied (sync=top): the user's bytes are the backing of
    # both overlays, the rest of the disk a hole.
    assert res.disk_bytes_copied == res.disks[0]["bytes_copied"]
    assert 2 * 65536 <= res.disk_bytes_copied < MiB, res.disks
    assert disk_files(g) != old and not Path(old[0]).exists()  # the source's overlay went
    check_sole_writer(g, user)
    await disk.check(g, tmp)

    res = await g.migrate(MigrationOptions(mode=ZC))  # ...and it moves on
    assert res.guest_ok and res.disk_bytes_copied == 0
    await disk.write(g, 0x44, 5 * MiB)
    await disk.check(g, tmp)
    check_sole_writer(g, user)
    assert digest(user) == before


@pytest.mark.parametrize("disk_guest", [RamBackend.MEMFD], indirect=True)
async def test_disk_cpr_transfer(disk_guest: tuple[Guest, str]) -> None:
    g, user = disk_guest
    disk = Contents()
    await disk.write(g, 0x44, MiB)
    res = await g.migrate(MigrationOptions(mode=CPR))
    assert res.guest_ok and res.disks[0]["mode"] == "shared"
    await disk.check(g, Path(user).parent)
    check_sole_writer(g, user)


async def test_no_second_writer(disk_guest: tuple[Guest, str], tmp_path: Path) -> None:
    """The incoming destination opens the disk without a lock; a QEMU that would write it
    while the guest runs is refused by QEMU's image locking, and so is a guest that wants
    to write the user's file in place while another reads it (exit 2, nothing started)."""
    g, user = disk_guest
    overlay = disk_files(g)[0]
    spec = local_host(g).local.spec_of(g.record)
    rogue = build_argv(spec, qmp_path=tmp_path / "rogue.sock",
                       serial_path=tmp_path / "rogue.log", ram_path=str(tmp_path / "ram"))
    proc = subprocess.run([a for a in rogue if a != "-no-reboot"] + ["-S"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode != 0 and "lock" in proc.stderr, proc.stderr
    check_sole_writer(g, user)
    other = tmp_path / "other-state"
    for extra in (["--disk-in-place"], []):
        target = user if extra else overlay
        cli = run_cli(other, "guest", "start", "x", "--memory", "64M", "--disk", target,
                      *extra, "--json")
        assert cli.returncode == 2, cli.stderr
        assert "in use" in cli.stderr
    assert qemu_pids(str(other)) == []


def test_bad_disks_are_refused(state_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "x.vmdk").unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(tmp_path / "x.vmdk"), "1M"],
                   check=True)
    good = make_user_disk(tmp_path / "good.raw")
    for args in (["--disk", str(tmp_path / "missing.qcow2")],
                 ["--disk", str(tmp_path / "x.vmdk")],
                 ["--disk", str(tmp_path)],
                 ["--disk", good, "--disk", good],
                 ["--disk", good, "--cloud-vm", "l1a"]):
        proc = run_cli(state_dir, "guest", "start", "b", "--memory", "64M", *args, "--json")
        assert proc.returncode == 2, (args, proc.stderr)
    assert not (state_dir / "guests" / "b").exists()
    assert qemu_pids(str(state_dir)) == []


async def test_in_place_disk(host: Host, tmp_path: Path) -> None:
    """``--disk-in-place``: the guest writes the user's file; it moves by sharing only."""
    user = make_user_disk(tmp_path / "inplace.raw")
    async with await host.start_guest("ip", "64M", image="test", touch=50, disks=[user],
                                      disk_in_place=True) as g:
        await g.wait_ready(timeout=60)
        (d,) = (await g.status()).disks
        assert d["mode"] == "in-place" and d["path"] == user and d["backing"] is None
        await Contents().write(g, 0x55, 5 * MiB)
        res = await g.migrate(MigrationOptions(mode=ZC))
        assert res.guest_ok and res.disks[0]["mode"] == "shared"
        check_sole_writer(g)
        with pytest.raises(VmbeamError) as exc:
            await g.migrate(MigrationOptions(mode=PC))
        assert exc.value.exit_code == 2
        await hmp_io(g, "disk0", "flush")
    with open(user, "rb") as f:  # the guest's write landed in the user's file itself
        f.seek(5 * MiB)
        assert f.read(65536) == b"\x55" * 65536


# -- guests that boot from their disk through firmware ---------------------------------------
def boot_image(host: Host, tmp_path: Path) -> str:
    """The user's bootable qcow2: images/bootdisk's (SYSLINUX booting the test guest)."""
    src = host.settings.images_dir / "testguest-disk.qcow2"
    assert src.is_file(), "run `make images`"
    dst = tmp_path / "boot.qcow2"
    shutil.copyfile(src, dst)
    return str(dst)


async def test_guest_boots_from_its_qcow2_and_moves_by_every_method(
        host: Host, tmp_path: Path) -> None:
    """No --image: SeaBIOS boots the first disk (SYSLINUX, then the test guest from it),
    with a data disk and 2 vCPUs; zero-copy, precopy and zero-copy again keep every
    acknowledged write and the guest's memory; the user's files are never written."""
    boot, data = boot_image(host, tmp_path), make_user_disk(tmp_path / "data.qcow2", "qcow2")
    sums = digest(boot), digest(data)
    proc = run_cli(host.settings.state_dir, "guest", "start", "fw", "--memory", "64M",
                   "--cpus", "2", "--disk", boot, "--disk", data, "--json")
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["image"] == "disk" and st["cpus"] == 2
    assert [d["backing"] for d in st["disks"]] == [boot, data]
    g = await host.guest("fw")
    try:
        await g.wait_ready(timeout=120)
        serial = Path(g.record.serial_path).read_text()
        assert "touch=50" in serial  # the command line SYSLINUX read from the disk
        disk = Contents()
        for n, mode in enumerate((ZC, PC, ZC)):
            await disk.write(g, 0x70 + n, (2 + n) * MiB, "disk1")
            res = await g.migrate(MigrationOptions(mode=mode))
            assert res.guest_ok is True, mode
            assert [d["id"] for d in res.disks] == ["disk0", "disk1"]
            assert (res.disk_bytes_copied == 0) == (mode is ZC), (mode, res.disks)
            await disk.check(g, tmp_path, disk=1)
            check_sole_writer(g)
            assert len(await g.qmp("query-cpus-fast")) == 2
        assert (await g.status()).memory_ok is True
    finally:
        await host.stop_guest("fw")
    assert (digest(boot), digest(data)) == sums
    assert qemu_pids(str(host.settings.state_dir)) == []


async def test_guest_without_heartbeats_moves_unchecked(host: Host, tmp_path: Path) -> None:
    """A disk whose OS sends no heartbeat (here a boot sector that spins): `guest start`
    returns once QEMU runs, and a move reports the guest unchecked (guest_ok None), not
    failed."""
    spin = tmp_path / "spin.raw"
    with open(spin, "wb") as f:
        f.truncate(MiB)
        f.write(b"\xeb\xfe" + bytes(508) + b"\x55\xaa")  # jmp $; boot signature
    proc = run_cli(host.settings.state_dir, "guest", "start", "spin", "--memory", "64M",
                   "--disk", str(spin), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["image"] == "disk"
    g = await host.guest("spin")
    try:
        res = await g.migrate(MigrationOptions(mode=ZC))
        assert res.status == "completed" and res.guest_ok is None
        assert (await g.qmp("query-status"))["status"] == "running"
    finally:
        await host.stop_guest("spin")


def test_disk_image_needs_a_disk(state_dir: Path) -> None:
    proc = run_cli(state_dir, "guest", "start", "nd", "--memory", "64M", "--image", "disk")
    assert proc.returncode == 2 and "--disk" in proc.stderr.strip().splitlines()[-1]
    assert not (state_dir / "guests" / "nd").exists()


# -- the disk cells of the fault matrix (flat) ----------------------------------------------
DISK_CELLS = [(what, when, mode, history)
              for what, when in (("dst-killed", "prepare"), ("dst-killed", "confirm"))
              for mode in (ZC, PC)
              for history in ("fresh", "moved", "moved-back")]


@pytest.mark.parametrize(("what", "when", "mode", "history"), DISK_CELLS,
                         ids=[f"flat-disk-{w}@{t}-{m.value}-{h}" for w, t, m, h in DISK_CELLS])
async def test_flat_disk_fault(disk_guest: tuple[Guest, str], what: str, when: str,
                               mode: MigrationMode, history: str) -> None:
    """A failed move of a guest with a disk: no acknowledged write lost, the disk written
    only by the QEMU that runs the guest (or, held for an operator, by none), nothing of the
    copy left open — and a guest that runs moves again."""
    g, user = disk_guest
    host, tmp, disk = g.host, Path(user).parent, Contents()
    # History: moved = copied once (precopy: a new overlay); moved back = and shared again.
    if history != "fresh":
        assert (await g.migrate(MigrationOptions(mode=PC))).guest_ok
    if history == "moved-back":
        assert (await g.migrate(MigrationOptions(mode=ZC))).guest_ok
    await disk.write(g, 0x66, 6 * MiB)
    src_pid = g.record.pid
    src_files = disk_files(g)

    async def kill_dst(dst: QemuProcess) -> None:
        os.kill(dst.pid, signal.SIGKILL)
    hook = "before_switch" if when == "prepare" else "after_switch"
    with injected(**{hook: kill_dst}):
        try:
            await g.migrate(MigrationOptions(mode=mode))
        except VmbeamError as exc:
            rc = exc.exit_code
        else:
            rc = 0
    rec = g.record
    pids = qemu_pids(str(host.settings.state_dir))
    assert pids == [src_pid] == [rec.pid] and disk_files(g) == src_files
    if when == "confirm":
        # The source handed over (its nodes inactive, its write lock dropped) and is kept
        # paused: nobody writes the disk until an operator decides.
        assert rc == 4 and rec.state is GuestState.NEEDS_ACTION
        assert writers(Path(src_files[0]), pids) == []
        st = await local_host(g).process(rec).execute("query-status")
        assert st["status"] == "postmigrate"
        await disk.check(g, tmp)  # everything acknowledged is in the file it handed over
        return
    assert rc == 3 and rec.state is GuestState.RUNNING
    check_sole_writer(g, user)
    assert await g.qmp("query-block-jobs") == []  # no mirror left on the source
    assert [n["node-name"] for n in await g.qmp("query-named-block-nodes")
            if n["node-name"].endswith("-mirror")] == []
    leftovers = {p.name for p in Path(src_files[0]).parent.glob("disk*.qcow2")}
    assert leftovers == {Path(f).name for f in src_files}
    await disk.check(g, tmp)
    await disk.write(g, 0x77, 7 * MiB)
    res = await g.migrate(MigrationOptions(mode=mode))  # ...and it moves again
    assert res.guest_ok
    check_sole_writer(g, user)
    await disk.check(g, tmp)


# -- cloud-init seeds ------------------------------------------------------------------------
def seed_file(seed: Path, name: str) -> str:
    """A file of a NoCloud seed, read with mtools (no mount)."""
    out = subprocess.run(["mtype", "-i", str(seed), f"::{name}"], capture_output=True,
                         text=True)
    return out.stdout if out.returncode == 0 else f"<no {name}: {out.stderr.strip()}>"


async def test_cloud_init_seed_moves_with_the_guest(host: Host, tmp_path: Path) -> None:
    """``--cloud-init``: a FAT seed labelled CIDATA with the user's user-data and meta-data
    naming the guest is its last disk (no NIC here: no network config); it moves as its
    disks do and goes with the guest."""
    spin = tmp_path / "spin.raw"
    with open(spin, "wb") as f:
        f.truncate(MiB)
        f.write(b"\xeb\xfe" + bytes(508) + b"\x55\xaa")
    ud = tmp_path / "user-data"
    ud.write_text("#cloud-config\nhostname: sd\n")
    proc = run_cli(host.settings.state_dir, "guest", "start", "sd", "--memory", "64M",
                   "--disk", str(spin), "--cloud-init", str(ud), "--json")
    assert proc.returncode == 0, proc.stderr
    disks = json.loads(proc.stdout)["disks"]
    seed = host.settings.state_dir / "guests" / "sd" / "seed.raw"
    assert [d["user_file"] for d in disks] == [str(spin), str(seed)]
    assert disks[1]["serial"] == "vmbeam-1" and disks[1]["user_format"] == "raw"
    label = subprocess.run(["mlabel", "-i", str(seed), "-s", "::"], capture_output=True,
                           text=True, check=True).stdout
    assert "CIDATA" in label
    assert seed_file(seed, "user-data") == ud.read_text()
    meta = seed_file(seed, "meta-data")
    assert "local-hostname: sd" in meta and "instance-id: vmbeam-sd-" in meta
    assert seed_file(seed, "network-config").startswith("<no ")
    g = await host.guest("sd")
    try:
        for mode in (ZC, PC):
            res = await g.migrate(MigrationOptions(mode=mode))
            assert res.status == "completed" and [d["id"] for d in res.disks] == ["disk0",
                                                                                    "disk1"]
            check_sole_writer(g)
    finally:
        await host.stop_guest("sd")
    assert not (host.settings.state_dir / "guests" / "sd").exists()


def test_bad_cloud_init_is_refused(state_dir: Path, tmp_path: Path) -> None:
    disk = make_user_disk(tmp_path / "d.raw")
    good, plain = tmp_path / "ud", tmp_path / "plain"
    good.write_text("#cloud-config\n")
    plain.write_text("hostname: x\n")
    big = tmp_path / "big"
    big.write_text("#cloud-config\n" + "#" * (600 << 10))
    copies = []
    for i in range(8):
        copies += ["--disk", make_user_disk(tmp_path / f"c{i}.raw")]
    for args in (["--disk", disk, "--cloud-init", str(tmp_path / "missing")],
                 ["--disk", disk, "--cloud-init", str(plain)],
                 ["--disk", disk, "--cloud-init", str(big)],
                 ["--disk", disk, "--cloud-init", str(tmp_path)],
                 ["--image", "test", "--disk", disk, "--cloud-init", str(good)],
                 ["--cloud-init", str(good)],
                 [*copies, "--cloud-init", str(good)]):
        proc = run_cli(state_dir, "guest", "start", "ci", "--memory", "64M", *args, "--json")
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (state_dir / "guests" / "ci").exists()
    assert qemu_pids(str(state_dir)) == []
