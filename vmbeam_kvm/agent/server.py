"""The agent inside a cloud VM (L1): runs guests (L2) whose RAM is a region L0 attached.

L0 hot-plugs a beam region into this VM as an ``ivshmem-plain`` PCI device; its BAR2 *is* the
region. The agent finds regions by the identity page at the BAR's end, starts L2 QEMUs with
``mem-path=/dev/mem,offset=<BAR2>`` (write-back: the BAR sits above 4 GiB, docs/design.md
§4.10), and passes QMP commands through for L0's migration orchestrator. Everything arrives
over the virtio-serial port, which only L0 can reach. A guest's disks arrive as SCSI disks
L0 hot-plugged (beam disks, docs/design.md §11), found by their serial; the L2 opens them
O_DIRECT (no page cache here that could go stale when the disk moves on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import shutil
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..disks import Disk
from ..errors import BadInputError, DiskError, RegionError, VmbeamError
from ..heartbeat import read_status
from ..qemu.machine import GuestImage, MachineSpec, build_argv
from ..qemu.process import ProcessRef, QemuProcess
from ..region import RegionIdentity, parse_identity
from ..units import PAGE_SIZE
from .protocol import PORT_NAME, encode

log = logging.getLogger("vmbeam-agent")

IVSHMEM_IDS = ("0x1af4", "0x1110")
TLS_CREDS_ID = "vmbeam-mig-tls"
TLS_USER = "vmbeam"
# The RFC 7919 ffdhe2048 group: public, fixed parameters. Without a dh-params.pem QEMU
# generates fresh ones for every TLS server credential, which takes ~20 s under TCG.
FFDHE2048_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


@dataclass(frozen=True)
class MappedRegion:
    """A beam region as this cloud VM sees it: a PCI device and its BAR2 window."""

    pci: str
    bar_start: int
    bar_size: int
    identity: RegionIdentity

    def to_json(self) -> dict[str, Any]:
        return {"pci": self.pci, "bar_start": self.bar_start, "bar_size": self.bar_size,
                "region_id": self.identity.region_id, "ram_size": self.identity.ram_size,
                "guest": self.identity.guest}


def _read_phys(addr: int, length: int) -> bytes:
    fd = os.open("/dev/mem", os.O_RDONLY | os.O_SYNC)
    try:
        with mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=addr) as m:
            return bytes(m[:length])
    finally:
        os.close(fd)


def find_disk(serial: str, sysfs: Path = Path("/sys/block")) -> str | None:
    """The block device whose SCSI unit serial (VPD page 0x80) is ``serial``."""
    for dev in sorted(sysfs.glob("sd*")):
        with contextlib.suppress(OSError):
            page = (dev / "device" / "vpd_pg80").read_bytes()
            if page[4:4 + page[3]].decode(errors="replace").strip() == serial:
                return f"/dev/{dev.name}"
    return None


def scan_regions(sysfs: Path = Path("/sys/bus/pci/devices")) -> list[MappedRegion]:
    """Every ivshmem device whose BAR2 ends in a beam-region identity page."""
    found = []
    for dev in sorted(sysfs.iterdir()):
        try:
            ids = ((dev / "vendor").read_text().strip(), (dev / "device").read_text().strip())
            if ids != IVSHMEM_IDS:
                continue
            start, end, _flags = (int(x, 16) for x in
                                  (dev / "resource").read_text().splitlines()[2].split())
        except (OSError, IndexError, ValueError):
            continue
        if start == 0:
            continue  # BAR not assigned (yet)
        # No driver binds ivshmem, so nothing turns memory decoding on for us.
        with contextlib.suppress(OSError):
            if (dev / "enable").read_text().strip() == "0":
                (dev / "enable").write_text("1")
        size = end - start + 1
        try:
            ident = parse_identity(_read_phys(start + size - PAGE_SIZE, PAGE_SIZE), size)
        except (RegionError, OSError) as exc:
            log.warning("ivshmem %s: no region identity: %s", dev.name, exc)
            continue
        found.append(MappedRegion(dev.name, start, size, ident))
    return found


@dataclass
class L2Guest:
    """A guest running in this cloud VM."""

    name: str
    proc: QemuProcess
    serial: Path
    region: MappedRegion


class Agent:
    """Serves requests from L0 on the virtio-serial port."""

    def __init__(self, port: Path, state_dir: Path, images_dir: Path,
                 qemu: str = "qemu-system-x86_64", accel: str = "tcg") -> None:
        self.port, self.state_dir, self.images_dir = port, state_dir, images_dir
        self.qemu, self.accel = qemu, accel
        self.guests: dict[str, L2Guest] = {}

    async def _readopt(self) -> None:
        """Take back the guests an earlier agent instance started (they outlive it).

        A guest still waiting for its incoming migration is dropped: the orchestrator that
        was preparing it talked to the dead agent and will roll back, so it must not run.
        """
        for info in self.state_dir.glob("*/guest.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, VmbeamError):
                d = json.loads(info.read_text())
                ref = ProcessRef(d["pid"], d["start"])
                if not ref.alive():
                    info.unlink()
                    continue
                region = MappedRegion(d["pci"], d["bar_start"], d["bar_size"],
                                      RegionIdentity(d["region_id"], d["ram_size"], d["name"], 0))
                proc = QemuProcess.attach(ref, info.parent / "qmp.sock",
                                          info.parent / "qemu.log")
                if await proc.run_state() == "inmigrate":
                    log.info("dropping half-prepared incoming guest %s", d["name"])
                    proc.kill()
                    info.unlink()
                    await self._unplug_tap(d["name"])
                    continue
                self.guests[d["name"]] = L2Guest(d["name"], proc, info.parent / "serial.log",
                                                 region)
                log.info("re-adopted guest %s (pid %d)", d["name"], ref.pid)

    # -- transport ------------------------------------------------------------------------
    async def serve(self) -> None:
        """Serve forever on the port.

        The port reads EOF whenever L0 is not connected; it is never closed in between,
        because closing a virtio-serial port discards requests already queued in it.
        """
        await self._readopt()
        print(f"VMBEAM-AGENT ready {socket.gethostname()}", file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        self._fd = os.open(self.port, os.O_RDWR | os.O_NOCTTY)
        self._write_lock = threading.Lock()
        tasks: set[asyncio.Task[None]] = set()
        buf = b""
        while True:
            chunk = await loop.run_in_executor(None, os.read, self._fd, 1 << 16)
            if not chunk:
                buf = b""  # L0 went away: a partial line of its is garbage
                await asyncio.sleep(0.1)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                task = loop.create_task(self._handle(line))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]

    async def _handle(self, line: bytes) -> None:
        try:
            req = json.loads(line)
            req_id, op, args = req["id"], req["op"], req.get("args", {})
        except (ValueError, KeyError, TypeError):
            return  # garbage or a partial line from a reconnect: nothing to answer
        log.info("request %s %s", op, args)
        try:
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise BadInputError(f"unknown agent operation {op!r}")
            reply = {"id": req_id, "ok": True, "result": await handler(**args)}
        except (VmbeamError, OSError, TypeError) as exc:
            reply = {"id": req_id, "ok": False, "error": str(exc), "type": type(exc).__name__}
            log.warning("%s failed: %s", op, exc)
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._write, encode(reply))
        except OSError as exc:
            log.warning("reply to %s lost: %s", op, exc)

    # -- operations -----------------------------------------------------------------------
    async def op_ping(self) -> dict[str, Any]:
        return {"name": socket.gethostname(), "pid": os.getpid(),
                "guests": sorted(self.guests)}

    async def op_regions(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in await asyncio.to_thread(scan_regions)]

    async def _find_region(self, region_id: str, timeout: float = 20.0) -> MappedRegion:
        """The mapped region with this id; a hot-plugged device may need a moment."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for reg in await asyncio.to_thread(scan_regions):
                if reg.identity.region_id == region_id:
                    return reg
            if loop.time() > deadline:
                raise RegionError(f"region {region_id} is not attached to this cloud VM")
            with contextlib.suppress(OSError):
                Path("/sys/bus/pci/rescan").write_text("1")
            await asyncio.sleep(0.5)

    async def op_verify_region(self, region_id: str) -> dict[str, Any]:
        return (await self._find_region(region_id)).to_json()

    @staticmethod
    def _tap(name: str) -> str:
        return f"l2-{name}"[:15]

    async def _plug_tap(self, tap: str) -> None:
        """A tap on this cloud VM's lab bridge for a guest's NIC."""
        for cmd in (["ip", "tuntap", "add", "dev", tap, "mode", "tap"],
                    ["ip", "link", "set", tap, "master", "br0", "up"]):
            proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode:
                raise BadInputError(f"{' '.join(cmd)}: {err.decode().strip()}")

    async def _unplug_tap(self, name: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            "ip", "link", "del", self._tap(name), stderr=asyncio.subprocess.DEVNULL)
        await proc.wait()

    async def _find_disk(self, serial: str, timeout: float = 30.0) -> str:
        """The block device of a disk L0 just hot-plugged (the SCSI scan is asynchronous)."""
        if not Path("/sys/module/virtio_scsi").exists():
            proc = await asyncio.create_subprocess_exec(
                "modprobe", "-a", "virtio_scsi", "sd_mod", stderr=asyncio.subprocess.PIPE)
            await proc.communicate()
        deadline = asyncio.get_running_loop().time() + timeout
        while (path := find_disk(serial)) is None:
            if asyncio.get_running_loop().time() > deadline:
                raise DiskError(f"no disk with serial {serial} in this cloud VM")
            await asyncio.sleep(0.05)
        return path

    async def _open_disks(self, disks: list[dict[str, Any]]) -> tuple[Disk, ...]:
        out = []
        for d in disks:
            base = d.get("base_serial")
            out.append(Disk.from_wire(d, await self._find_disk(str(d["serial"])),
                                      await self._find_disk(str(base)) if base else None))
        return tuple(out)

    async def op_start_guest(self, name: str, memory: int, image: str, touch: int,
                             region_id: str, incoming: bool = False, mac: str = "",
                             ip: str = "", ticks: bool = True,
                             ticks_to: list[Any] | None = None, cpus: int = 1,
                             disks: list[dict[str, Any]] | None = None
                             ) -> dict[str, Any]:
        if name in self.guests and self.guests[name].proc.alive():
            raise BadInputError(f"guest {name!r} already runs in this cloud VM")
        region = await self._find_region(region_id)
        opened = await self._open_disks(disks or [])
        if region.identity.ram_size != memory:
            raise RegionError(f"region {region_id} holds {region.identity.ram_size} bytes of "
                              f"RAM, guest wants {memory}")
        gdir = self.state_dir / name
        gdir.mkdir(parents=True, exist_ok=True)
        qmp, serial, qlog = gdir / "qmp.sock", gdir / "serial.log", gdir / "qemu.log"
        with contextlib.suppress(FileNotFoundError):
            serial.unlink()
        nic = None
        if mac:
            await self._unplug_tap(name)  # a leftover of an earlier attempt
            await self._plug_tap(self._tap(name))
            nic = (self._tap(name), mac)
        spec = MachineSpec(name, memory, GuestImage(image), touch, self.accel, self.qemu,
                           self.images_dir, nic=nic, guest_ip=ip, ticks=ticks, cpus=int(cpus),
                           disks=opened)
        argv = build_argv(spec, qmp_path=qmp, serial_path=serial, ram_path="/dev/mem",
                          ram_offset=region.bar_start,
                          incoming=["defer"] if incoming else None,
                          ticks_to=(str(ticks_to[0]), int(ticks_to[1])) if ticks_to else None)
        try:
            proc = await QemuProcess.launch(argv, qmp, qlog, pidfile=False)
        except VmbeamError:
            await self._unplug_tap(name)
            raise
        self.guests[name] = L2Guest(name, proc, serial, region)
        (gdir / "guest.json").write_text(json.dumps({
            "name": name, "pid": proc.pid, "start": proc.ref.start_time, "pci": region.pci,
            "bar_start": region.bar_start, "bar_size": region.bar_size,
            "region_id": region.identity.region_id, "ram_size": region.identity.ram_size}))
        return {"pid": proc.pid, "region": region.to_json(), "agent_pid": os.getpid()}

    def _guest(self, name: str) -> L2Guest:
        guest = self.guests.get(name)
        if guest is None:
            raise BadInputError(f"no guest {name!r} in this cloud VM")
        return guest

    async def op_qmp(self, name: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self._guest(name).proc.execute(cmd, args)

    async def op_migration_tls(self, name: str, endpoint: str, key: str) -> dict[str, Any]:
        """Give the guest's QEMU a TLS pre-shared-key credential for its next migration.

        L0 makes one key per migration and hands it to both ends over their private agent
        channels, so no other cloud VM on the L1-L1 network can feed or read the stream.
        """
        if endpoint not in ("client", "server") or not all(c in "0123456789abcdef"
                                                            for c in key) or len(key) < 32:
            raise BadInputError("migration_tls needs endpoint client|server and a hex key")
        guest = self._guest(name)
        tls_dir = self.state_dir / name / "tls"
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(tls_dir / "keys.psk", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{TLS_USER}:{key}\n")
        (tls_dir / "dh-params.pem").write_text(FFDHE2048_PEM)
        with contextlib.suppress(VmbeamError):  # the credential of an earlier migration
            await guest.proc.execute("object-del", {"id": TLS_CREDS_ID})
        creds = {"qom-type": "tls-creds-psk", "id": TLS_CREDS_ID, "endpoint": endpoint,
                 "dir": str(tls_dir)}
        if endpoint == "client":  # the server looks the client's name up in keys.psk
            creds["username"] = TLS_USER
        await guest.proc.execute("object-add", creds)
        return {"tls_creds": TLS_CREDS_ID}

    async def op_status(self, name: str) -> dict[str, Any]:
        guest = self._guest(name)
        alive = guest.proc.alive()
        run_state = None
        if alive:
            with contextlib.suppress(VmbeamError):
                run_state = await guest.proc.run_state()
        serial = read_status(guest.serial)
        hb = serial.heartbeat
        return {"alive": alive, "run_state": run_state, "pid": guest.proc.pid,
                "agent_pid": os.getpid(),
                "heartbeat": None if hb is None else hb.__dict__, "disk_acks": serial.disk_acks,
                "region_id": guest.region.identity.region_id}

    async def op_stop_guest(self, name: str, kill: bool = False) -> dict[str, Any]:
        guest = self.guests.pop(name, None)
        if guest is None:
            return {"stopped": False}
        with contextlib.suppress(OSError):
            (self.state_dir / name / "guest.json").unlink()
        shutil.rmtree(self.state_dir / name / "tls", ignore_errors=True)  # spent keys
        if kill:
            guest.proc.kill()
        else:
            await guest.proc.quit()
        await self._unplug_tap(name)
        return {"stopped": True}

    async def op_signal(self, name: str, signum: int) -> dict[str, Any]:
        """Send a signal to a guest's L2 QEMU without forgetting it (an operator's last resort;
        the fault tests' SIGKILL). What follows is seen through ``status``."""
        guest = self._guest(name)
        if signum not in (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT):
            raise BadInputError(f"signal {signum} is not one of TERM, KILL, STOP, CONT")
        if guest.proc.alive():
            os.kill(guest.proc.pid, signum)
        return {"pid": guest.proc.pid}

    async def op_restart(self) -> dict[str, Any]:
        """Exit so that init starts the agent afresh (e.g. after an update); guests keep
        running and are re-adopted."""
        asyncio.get_running_loop().call_later(0.1, os._exit, 0)
        return {"restarting": True}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="vmbeam-agent: %(message)s")
    port = Path(os.environ.get("VMBEAM_AGENT_PORT", f"/dev/virtio-ports/{PORT_NAME}"))
    agent = Agent(port, Path(os.environ.get("VMBEAM_AGENT_STATE", "/run/vmbeam")),
                  Path(os.environ.get("VMBEAM_IMAGES_DIR", "/opt/vmbeam/images")),
                  # L0's patched QEMU when it ships one on the source disk (README).
                  qemu=os.environ.get("VMBEAM_AGENT_QEMU", "qemu-system-x86_64"),
                  # A small translation cache: TCG's default (1 GiB) crowds a 2 GiB cloud VM.
                  accel=os.environ.get("VMBEAM_AGENT_ACCEL", "tcg,tb-size=256"))
    asyncio.run(agent.serve())


if __name__ == "__main__":
    main()
