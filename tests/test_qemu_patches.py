"""Guarantees that only the patched QEMU gives (qemu-patches/), driven through raw QMP.

* Patch A, ``x-revoke-memory-backend``: a cloud VM's QEMU drops a region at once, without
  the guest's help: no mapping, no fd, the guest reads the BAR as unassigned and its
  writes go nowhere, the VM runs on, and ``device_del`` still completes later.
* Patch B, migration capability ``x-ignore-shared-check``: a destination that maps other
  memory for a shared RAM block fails the incoming migration; the same memory passes.

The QEMU under test is ``$VMBEAM_QEMU``, else the cached patched build
(``scripts/build-qemu.sh --print-path``), else ``qemu-system-x86_64``.  A QEMU that lacks
the command or the capability (asked through QMP, never by version) reports the test as
``xfail("guarantee missing: ...")``, so a stock-QEMU run lists what it cannot promise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from vmbeam_kvm.qemu.machine import kvm_cpu

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "build" / "images"
REGION_SIZE = 1 << 20           # ivshmem BARs are powers of two; small fits any window
MARK = os.urandom(8)            # what the guest must read at the BAR while it has it
HEAD = f"0x{int.from_bytes(MARK, 'little'):016X}"
UNASSIGNED = {"0x" + "F" * 16, "0x" + "0" * 16}


def _resolve_qemu() -> str:
    env = os.environ.get("VMBEAM_QEMU")
    if env:
        return env
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([str(REPO / "scripts" / "build-qemu.sh"), "--print-path"],
                             capture_output=True, text=True, timeout=60)
        lines = out.stdout.strip().splitlines()
        if out.returncode == 0 and lines and os.access(lines[-1], os.X_OK):
            return lines[-1]
    return shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"


@pytest.fixture(scope="module")
def qemu_bin() -> str:
    return _resolve_qemu()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vbq-", dir="/tmp"))   # short: QMP socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Vm:
    """One QEMU process with a QMP socket and a serial log; killed on exit."""

    def __init__(self, qemu: str, workdir: Path, name: str, args: list[str],
                 pass_fds: tuple[int, ...] = (), accel: str = "tcg") -> None:
        self.qmp_path = workdir / f"{name}.qmp"
        self.serial_path = workdir / f"{name}.serial"
        self.stderr_path = workdir / f"{name}.stderr"
        cpu = ["-cpu", kvm_cpu(qemu)] if accel == "kvm" else []
        self.argv = [qemu, "-name", f"vbq-{name}", "-nodefaults", "-no-user-config",
                     "-display", "none", "-accel", accel, *cpu,
                     "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                     "-chardev", f"file,id=s0,path={self.serial_path}",
                     "-serial", "chardev:s0", *args]
        self.pass_fds = pass_fds
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QMPClient(name)
        self.events: list[dict[str, Any]] = []
        self._listener: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def __aenter__(self) -> Vm:
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, pass_fds=self.pass_fds)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited at start: {self.stderr()}")
            try:
                await self.qmp.connect(str(self.qmp_path))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self._listener = asyncio.create_task(self._listen())
        return self

    async def _listen(self) -> None:
        with contextlib.suppress(Exception):
            async for event in self.qmp.events:
                self.events.append(event)

    async def __aexit__(self, *exc: object) -> None:
        if self._listener:
            self._listener.cancel()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(name, args)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def serial(self) -> str:
        return self.serial_path.read_text(errors="replace") if self.serial_path.exists() else ""

    async def wait_serial(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.serial()[start:])
            if m:
                return m
            assert self.proc is not None and self.proc.poll() is None, \
                f"QEMU died: {self.stderr()}"
            assert time.monotonic() < deadline, \
                f"no {pattern!r} on serial within {timeout}s: {self.serial()[-800:]!r}"
            await asyncio.sleep(0.05)

    async def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev["event"] == name:
                    return ev
            assert time.monotonic() < deadline, f"no {name} event within {timeout}s"
            await asyncio.sleep(0.05)


async def require_command(vm: Vm, command: str, what: str) -> None:
    names = {c["name"] for c in await vm.cmd("query-commands")}
    if command not in names:
        pytest.xfail(f"guarantee missing: {what} (this QEMU has no {command})")


async def require_capability(vm: Vm, cap: str, what: str) -> None:
    caps = {c["capability"] for c in await vm.cmd("query-migrate-capabilities")}
    if cap not in caps:
        pytest.xfail(f"guarantee missing: {what} (this QEMU has no capability {cap})")


def memfd(size: int, name: str) -> int:
    fd = os.memfd_create(name, 0)
    os.ftruncate(fd, size)
    return fd


def holds_file(pid: int, fd: int) -> tuple[list[str], list[str]]:
    """Mappings and fds of process ``pid`` that reach the file behind our ``fd``."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    maps = [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split()) >= 5 and line.split()[3] == dev
            and line.split()[4] == str(st.st_ino)]
    fds = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            other = os.stat(entry)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                fds.append(entry.name)
    return maps, fds


# --- A Linux guest that reads and writes the ivshmem BAR through /dev/mem ----------------

PROBE = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo PROBE-BOOT
found() {
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1110 ]; then
            dev=$d; return 0
        fi
    done
    return 1
}
while ! found; do sleep 0.1; done
echo 1 > $dev/enable
bar=$(sed -n 3p $dev/resource | cut -d' ' -f1)
addr=$((bar))
echo "PROBE-BAR $bar"
# /dev/mem read()/write() refuse MMIO (EFAULT); devmem mmaps it like a driver would.
# Hammer the BAR with reads and writes in the background while the loop reports.
( while [ -e $dev ]; do
    devmem $((addr + 4096)) 64 >/dev/null
    devmem $((addr + 8192)) 64 0x5555aaaa5555aaaa
  done ) 2>/dev/null &
i=0
while [ -e $dev ]; do
    i=$((i + 1))
    devmem $((addr + 32)) 64 $i 2>/dev/null
    echo "PROBE i=$i head=$(devmem $addr 64 2>/dev/null)"
    sleep 0.05
done
echo PROBE-GONE
while :; do sleep 1; done
"""


def _newc(name: str, data: bytes, mode: int) -> bytes:
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    hdr = b"070701" + b"".join(f"{f:08X}".encode() for f in fields)
    out = hdr + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4) + data
    return out + b"\0" * (-len(out) % 4)


def probe_initrd(workdir: Path) -> Path:
    """The project's Linux-guest initrd plus /probe (concatenated cpio archives)."""
    base = IMAGES / "linux" / "initrd.img"
    if not base.is_file() or not (IMAGES / "linux" / "vmlinux").is_file():
        pytest.skip("Linux guest image missing: run `make images`")
    extra = _newc("probe", PROBE.encode(), 0o100755) + _newc("TRAILER!!!", b"", 0)
    path = workdir / "probe-initrd.img"
    path.write_bytes(base.read_bytes() + extra)
    return path


def linux_args(workdir: Path) -> list[str]:
    return ["-machine", "q35", "-m", "256M", "-smp", "1",
            "-device", "pcie-root-port,id=rp1,chassis=1,slot=1",
            "-kernel", str(IMAGES / "linux" / "vmlinux"), "-initrd", str(probe_initrd(workdir)),
            "-append", "console=ttyS0 quiet cryptomgr.notests mitigations=off panic=-1 "
                       "rdinit=/probe", "-no-reboot"]


async def plug_region(vm: Vm, fd: int) -> int:
    """add-fd + object-add + device_add, as vmbeam_kvm.cloudvm.attach_region does."""
    vm.qmp.send_fd_scm(fd)
    fdset = await vm.cmd("add-fd", {})
    await vm.cmd("object-add", {"qom-type": "memory-backend-file", "id": "region0",
                                "mem-path": f"/proc/self/fd/{fdset['fd']}",
                                "size": REGION_SIZE, "share": True})
    await vm.cmd("device_add", {"driver": "ivshmem-plain", "id": "iv0",
                                "memdev": "region0", "bus": "rp1"})
    return int(fdset["fdset-id"])


async def revoke_and_check(vm: Vm, fd: int, fdset: int) -> float:
    """Revoke region0; returns the latency (command issued -> no mapping left)."""
    assert holds_file(vm.pid, fd)[0], "region not mapped before the revoke"
    t0 = time.perf_counter()
    await vm.cmd("x-revoke-memory-backend", {"id": "region0"})
    maps, fds = holds_file(vm.pid, fd)
    latency = time.perf_counter() - t0
    assert maps == [], f"still mapped after revoke: {maps}"
    await vm.cmd("remove-fd", {"fdset-id": fdset})
    maps, fds = holds_file(vm.pid, fd)
    assert (maps, fds) == ([], []), f"QEMU still reaches the region: {maps} {fds}"
    assert await vm.cmd("qom-get", {"path": "/objects/region0", "property": "x-revoked"})
    # Idempotent.
    await vm.cmd("x-revoke-memory-backend", {"id": "region0"})
    return latency


async def guest_lines_after(vm: Vm, start: int, n: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = re.findall(r"PROBE i=\d+ head=(\S*)", vm.serial()[start:])
        if len(lines) >= n:
            return lines
        assert vm.proc is not None and vm.proc.poll() is None, f"QEMU died: {vm.stderr()}"
        assert time.monotonic() < deadline, f"guest stopped reporting: {vm.serial()[-600:]!r}"
        await asyncio.sleep(0.05)


async def eject_and_delete(vm: Vm) -> None:
    await vm.cmd("device_del", {"id": "iv0"})
    await vm.wait_event("DEVICE_DELETED", timeout=20)
    await vm.wait_serial("PROBE-GONE", timeout=10)
    await vm.cmd("object-del", {"id": "region0"})
    assert (await vm.cmd("query-status"))["status"] == "running"


@contextlib.contextmanager
def region() -> Iterator[int]:
    fd = memfd(REGION_SIZE, "vbq-region")
    os.pwrite(fd, MARK, 0)
    try:
        yield fd
    finally:
        os.close(fd)


async def test_revoke_while_guest_hammers_bar(qemu_bin: str, workdir: Path) -> None:
    """The region goes at once while a guest process reads and writes the BAR in a loop;
    QEMU survives, the guest reads unassigned memory, its writes go nowhere."""
    args = linux_args(workdir)
    with region() as fd:
        async with Vm(qemu_bin, workdir, "hammer", args) as vm:
            await require_command(vm, "x-revoke-memory-backend",
                                  "revoking a region without the cloud VM's help")
            await vm.wait_serial("PROBE-BOOT", timeout=40)
            fdset = await plug_region(vm, fd)
            await vm.wait_serial("PROBE-BAR", timeout=20)
            lines = await guest_lines_after(vm, 0, 3, timeout=20)
            assert lines[-1] == HEAD, f"guest does not see the region: {lines}"
            assert int.from_bytes(os.pread(fd, 8, 32), "little") > 0, "guest writes lost"

            await revoke_and_check(vm, fd, fdset)
            start = len(vm.serial())
            frozen = os.pread(fd, 8, 32)
            lines = await guest_lines_after(vm, start, 4, timeout=20)
            assert HEAD not in lines, f"guest still reads the region: {lines}"
            assert lines[-1] in UNASSIGNED, lines
            assert os.pread(fd, 8, 32) == frozen, "guest writes still reach the region"
            assert (await vm.cmd("query-status"))["status"] == "running"
            await eject_and_delete(vm)


async def test_revoke_paused_vm_then_eject(qemu_bin: str, workdir: Path) -> None:
    """A paused cloud VM (no kernel to ack anything) loses the region at once; resumed,
    it runs on, reads unassigned memory, and acknowledges the eject later."""
    args = linux_args(workdir)
    with region() as fd:
        async with Vm(qemu_bin, workdir, "paused", args) as vm:
            await require_command(vm, "x-revoke-memory-backend",
                                  "revoking a region from a paused cloud VM")
            await vm.wait_serial("PROBE-BOOT", timeout=40)
            fdset = await plug_region(vm, fd)
            await guest_lines_after(vm, 0, 2, timeout=20)
            await vm.cmd("stop")
            latency = await revoke_and_check(vm, fd, fdset)
            assert latency < 1.0, f"revoke took {latency:.3f}s"
            await vm.cmd("device_del", {"id": "iv0"})    # nobody can ack it yet
            await asyncio.sleep(0.3)
            assert not any(e["event"] == "DEVICE_DELETED" for e in vm.events)
            start = len(vm.serial())
            await vm.cmd("cont")
            await vm.wait_event("DEVICE_DELETED", timeout=20)
            await vm.wait_serial("PROBE-GONE", timeout=10, start=start)
            heads = re.findall(r"PROBE i=\d+ head=(\S*)", vm.serial()[start:])
            # The first line may carry a read from before the stop.
            assert set(heads[1:]) <= UNASSIGNED, heads
            await vm.cmd("object-del", {"id": "region0"})
            assert (await vm.cmd("query-status"))["status"] == "running"


async def test_revoke_refuses_what_it_must_not_take(qemu_bin: str, workdir: Path) -> None:
    """Guest RAM (main RAM, a DIMM) and anything that is not shared fd memory stay."""
    ram = memfd(64 << 20, "vbq-ram")
    dimm = memfd(128 << 20, "vbq-dimm")
    try:
        args = ["-machine", "q35,memory-backend=ram", "-m", "64M,slots=2,maxmem=1G", "-S",
                "-object", f"memory-backend-file,id=ram,mem-path=/proc/self/fd/{ram},"
                           f"size={64 << 20},share=on",
                "-object", f"memory-backend-file,id=dimm0,mem-path=/proc/self/fd/{dimm},"
                           f"size={128 << 20},share=on",
                "-device", "pc-dimm,id=d0,memdev=dimm0",
                "-object", "iothread,id=io0",
                "-object", f"memory-backend-ram,id=anon,size={REGION_SIZE}"]
        async with Vm(qemu_bin, workdir, "refuse", args, pass_fds=(ram, dimm)) as vm:
            await require_command(vm, "x-revoke-memory-backend",
                                  "QEMU refusing to revoke guest RAM")
            cases = {"ram": "machine's RAM", "nope": "not found",
                     "io0": "not a memory backend", "anon": "not shared file or memfd",
                     "dimm0": r"used by '/machine/peripheral/d0' \(pc-dimm\)"}
            for obj, why in cases.items():
                with pytest.raises(ExecuteError, match=why):
                    await vm.cmd("x-revoke-memory-backend", {"id": obj})
            assert holds_file(vm.pid, ram)[0], "main RAM lost its mapping"
            assert holds_file(vm.pid, dimm)[0], "the DIMM lost its mapping"
            assert not await vm.cmd("qom-get", {"path": "/objects/ram",
                                                "property": "x-revoked"})
            await vm.cmd("cont")
            assert (await vm.cmd("query-status"))["status"] == "running"
    finally:
        os.close(ram)
        os.close(dimm)


@pytest.mark.kvm
async def test_kvm_revoke_removes_memslot_while_guest_runs(qemu_bin: str, workdir: Path,
                                                           kvm_runs: str) -> None:
    """Under KVM a revoked region is a memslot removed from a running VM: the BAR the
    firmware mapped goes, the VM's QEMU lets go of the memory, and the guest runs on with
    its own memory intact (the test guest, as kvm_pvm runs no Debian kernel)."""
    guest = IMAGES / "testguest.bin"
    if not guest.is_file():
        pytest.skip("test guest image missing: run `make images`")
    with region() as fd:
        args = ["-machine", "q35", "-m", "64M", "-kernel", str(guest),
                "-append", "touch=5 hb_ms=50",
                "-object", f"memory-backend-file,id=region0,mem-path=/proc/self/fd/{fd},"
                           f"size={REGION_SIZE},share=on",
                "-device", "ivshmem-plain,id=iv0,memdev=region0"]
        async with Vm(qemu_bin, workdir, "kvmrevoke", args, pass_fds=(fd,),
                      accel="kvm") as vm:
            await require_command(vm, "x-revoke-memory-backend",
                                  "revoking a region from a KVM guest")
            await vm.wait_serial(r"READY pages=", timeout=90)
            # The firmware enabled the BAR: the region is guest-physical memory (a memslot).
            bars = [b for bus in await vm.cmd("query-pci") for dev in bus["devices"]
                    if dev.get("qdev_id") == "iv0" for b in dev["regions"]
                    if b.get("size") == REGION_SIZE]
            assert bars and bars[0]["address"] not in (0, 0xFFFFFFFFFFFFFFFF), bars
            mtree = await vm.cmd("human-monitor-command", {"command-line": "info mtree -f"})
            assert "region0" in mtree, "the BAR is not mapped into the address space"
            maps, fds = holds_file(vm.pid, fd)
            assert maps and fds, "QEMU does not hold the region before the revoke"
            before = len(vm.serial())
            t0 = time.perf_counter()
            await vm.cmd("x-revoke-memory-backend", {"id": "region0"})
            latency = time.perf_counter() - t0
            assert holds_file(vm.pid, fd)[0] == [], "still mapped after the revoke"
            assert await vm.cmd("qom-get", {"path": "/objects/region0",
                                            "property": "x-revoked"})
            mtree = await vm.cmd("human-monitor-command", {"command-line": "info mtree -f"})
            assert "region0" not in mtree, "the revoked memory is still guest-physical"
            # The VM runs on under KVM, its own RAM intact.
            await vm.wait_serial(r"HB seq=\d+ .*ok=1", timeout=30, start=before)
            mark = len(vm.serial())
            await vm.wait_serial(r"HB seq=\d+ .*ok=1", timeout=30, start=mark)
            assert (await vm.cmd("query-status"))["status"] == "running"
            assert latency < 1.0, f"revoke took {latency:.3f}s"


# --- Patch B ------------------------------------------------------------------------------

GUEST_RAM = 128 << 20


def _ram_args(fd: int, touch: int = 30) -> list[str]:
    guest = IMAGES / "testguest.bin"
    if not guest.is_file():
        pytest.skip("test guest image missing: run `make images`")
    return ["-machine", "q35,memory-backend=ram", "-m", f"{GUEST_RAM}B",
            "-object", f"memory-backend-file,id=ram,mem-path=/proc/self/fd/{fd},"
                       f"size={GUEST_RAM},share=on",
            "-kernel", str(guest), "-append", f"touch={touch} hb_ms=50"]


CAPS = ["x-ignore-shared", "return-path", "x-ignore-shared-check"]


async def migrate_shared(qemu_bin: str, workdir: Path, *, same_memory: bool,
                         accel: str = "tcg") -> dict[str, Any]:
    """Flat zero-copy move of a test guest; the destination maps the source's memfd or
    another one of the same size.  Returns what each side reports."""
    # Under kvm_pvm every page first touched costs ~0.4 ms: touch less there.
    touch = 30 if accel == "tcg" else 5
    wait = 30 if accel == "tcg" else 90
    src_fd = memfd(GUEST_RAM, "vbq-src-ram")
    dst_fd = src_fd if same_memory else memfd(GUEST_RAM, "vbq-dst-ram")
    sock = workdir / "mig.sock"
    caps = [{"capability": c, "state": True} for c in CAPS]
    try:
        async with Vm(qemu_bin, workdir, "src", _ram_args(src_fd, touch), pass_fds=(src_fd,),
                      accel=accel) as src:
            await require_capability(src, "x-ignore-shared-check",
                                     "QEMU proving shared RAM is the same memory")
            await src.wait_serial(r"READY pages=", timeout=wait)
            await src.wait_serial(r"HB seq=\d+", timeout=10)
            dst_args = [*_ram_args(dst_fd, touch), "-incoming", "defer"]
            async with Vm(qemu_bin, workdir, "dst", dst_args, pass_fds=(dst_fd,),
                          accel=accel) as dst:
                await dst.cmd("migrate-set-capabilities", {"capabilities": caps})
                await dst.cmd("migrate-incoming", {"uri": f"unix:{sock}",
                                                   "exit-on-error": False})
                await src.cmd("migrate-set-capabilities", {"capabilities": caps})
                await src.cmd("migrate", {"uri": f"unix:{sock}"})
                deadline = time.monotonic() + 30
                while True:
                    s = await src.cmd("query-migrate")
                    d = await dst.cmd("query-migrate")
                    dst_status = (await dst.cmd("query-status"))["status"]
                    done_src = s.get("status") in ("completed", "failed")
                    done_dst = d.get("status") in ("failed",) or dst_status == "running"
                    if done_src and done_dst:
                        break
                    assert time.monotonic() < deadline, (s, d)
                    await asyncio.sleep(0.05)
                result: dict[str, Any] = {"src": s, "dst": d, "dst_status": dst_status,
                                          "src_status": (await src.cmd("query-status"))}
                if s.get("status") == "failed":
                    # The source can go on running the guest.
                    if result["src_status"]["status"] != "running":
                        await src.cmd("cont")
                    mark = len(src.serial())
                    await src.wait_serial(r"HB seq=\d+ .*ok=1", timeout=wait, start=mark)
                    result["src_resumed"] = True
                else:
                    mark = len(dst.serial())
                    await dst.wait_serial(r"HB seq=\d+ .*ok=1", timeout=wait, start=mark)
                    result["dst_guest_ok"] = True
                return result
    finally:
        os.close(src_fd)
        if dst_fd != src_fd:
            os.close(dst_fd)


ACCELS = [pytest.param("tcg"), pytest.param("kvm", marks=pytest.mark.kvm)]


@pytest.fixture(params=ACCELS)
def accel(request: pytest.FixtureRequest) -> str:
    """Each patch B test under TCG and under KVM (where /dev/kvm runs the test guest)."""
    if request.param == "kvm":
        request.getfixturevalue("kvm_runs")
    return str(request.param)


async def test_ignore_shared_check_refuses_other_memory(qemu_bin: str, workdir: Path,
                                                        accel: str) -> None:
    r = await migrate_shared(qemu_bin, workdir, same_memory=False, accel=accel)
    assert r["dst"]["status"] == "failed", r
    assert r["dst_status"] != "running", r
    desc = r["dst"].get("error-desc", "")
    assert "x-ignore-shared-check" in desc and "not the source's memory" in desc, desc
    assert r["src"]["status"] == "failed", r
    assert r.get("src_resumed"), r


async def test_ignore_shared_check_passes_same_memory(qemu_bin: str, workdir: Path,
                                                      accel: str) -> None:
    r = await migrate_shared(qemu_bin, workdir, same_memory=True, accel=accel)
    assert r["src"]["status"] == "completed", r
    assert r["dst_status"] == "running", r
    assert r.get("dst_guest_ok"), r
