"""The host: the entry point of the Python API and of every CLI command.

A :class:`Host` owns one state directory (store, sockets, logs) and starts, finds, stops and
migrates the guests recorded there. Opening it resolves any migration that a crashed command
left half-done, before anything else touches the guests.

Example::

    async with Host(Settings(accel=Accel.TCG)) as host:
        async with await host.start_guest("web", memory="256M") as guest:
            await guest.wait_ready()
            result = await guest.migrate(MigrationOptions(mode=MigrationMode.ZERO_COPY))
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from .accel import resolve_accel
from .config import Settings
from .errors import (
    BadInputError,
    GuestBusyError,
    QMPCommandError,
    UnknownGuestError,
    VmbeamError,
)
from .guest import Guest, GuestStatus
from .heartbeat import Heartbeat, read_status
from .migration import MigrationOptions, MigrationResult, migrate_local, recover
from .nested import CloudOps
from .qemu.machine import GuestImage, MachineSpec, RamBackend, build_argv
from .qemu.process import ProcessRef, QemuProcess
from .region import BeamRegion
from .store import GuestRecord, GuestState, MigrationPhase, Store
from .units import PAGE_SIZE, parse_percent, parse_size

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
MIN_MEMORY = 32 << 20
_MAX_SOCKET_PATH = 107


def mem_available() -> int:
    """Host memory available for new guests (MemAvailable), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


class Host:
    """vmbeam-kvm on this machine: guests, their regions and their migrations."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._store: Store | None = None
        self._procs: dict[ProcessRef, QemuProcess] = {}
        self._cloud: CloudOps | None = None

    @property
    def cloud(self) -> CloudOps:
        """Cloud VMs (L1) on this host and the guests inside them."""
        if self._cloud is None:
            self._cloud = CloudOps(self)
        return self._cloud

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("Host is not open: use `async with Host(...)`")
        return self._store

    async def __aenter__(self) -> Host:
        self._store = Store(self.settings.state_dir)
        try:
            await self.recover()
            self.cloud.reap()
        except BaseException:
            self._store.close()
            self._store = None
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._cloud is not None:
            await self._cloud.close()
            self._cloud = None
        for proc in list(self._procs.values()):
            await proc.close()
        self._procs.clear()
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- processes ------------------------------------------------------------------------
    def process(self, rec: GuestRecord) -> QemuProcess:
        """The QEMU process that currently runs ``rec`` (re-attached if needed)."""
        return self.attach_process(ProcessRef(rec.pid, rec.pid_start), Path(rec.qmp_path),
                                   Path(rec.log_path))

    def attach_process(self, ref: ProcessRef, qmp: Path, log: Path) -> QemuProcess:
        """A cached handle on a QEMU we launched or one an earlier command launched."""
        proc = self._procs.get(ref)
        if proc is None:
            proc = self._procs[ref] = QemuProcess.attach(ref, qmp, log)
        return proc

    def adopt(self, proc: QemuProcess) -> None:
        """Keep a launched process's handle (and its Popen, for reaping)."""
        self._procs[proc.ref] = proc

    def forget(self, proc: QemuProcess) -> None:
        self._procs.pop(proc.ref, None)

    def instance_paths(self, name: str, instance: int) -> tuple[Path, Path, Path]:
        """QMP socket, serial log and QEMU log of one QEMU instance of a guest."""
        d = self.store.guest_dir(name)
        qmp = d / f"qmp-{instance}.sock"
        if len(str(qmp)) > _MAX_SOCKET_PATH:
            raise BadInputError(f"state directory path too long for a unix socket: {qmp}")
        return qmp, d / f"serial-{instance}.log", d / f"qemu-{instance}.log"

    # -- guests ---------------------------------------------------------------------------
    @staticmethod
    def validate_name(name: str) -> None:
        if not _NAME_RE.match(name):
            raise BadInputError(f"invalid name {name!r}: use 1-32 letters, digits, "
                                f"'.', '_' or '-'")

    def validate_new_guest(self, name: str, memory: int) -> None:
        self.validate_name(name)
        if memory % PAGE_SIZE:
            raise BadInputError(f"memory size {memory} is not a multiple of the page size "
                                f"({PAGE_SIZE} bytes)")
        if memory < MIN_MEMORY:
            raise BadInputError(f"memory size {memory} is below the minimum of "
                                f"{MIN_MEMORY >> 20} MiB")
        avail = mem_available()
        if memory > avail:
            raise BadInputError(f"memory size {memory >> 20} MiB exceeds the host's available "
                                f"memory ({avail >> 20} MiB)")
        with contextlib.suppress(UnknownGuestError):
            self.store.get_guest(name)
            raise BadInputError(f"a guest named {name!r} already exists")

    async def start_guest(self, name: str, memory: int | str, *, image: str = "test",
                          touch: int | str = 70, qemu: str | None = None,
                          backend: RamBackend = RamBackend.REGION,
                          cloud_vm: str | None = None, net: bool | None = None) -> Guest:
        """Start a guest whose RAM is a new beam region; returns once QEMU answers QMP.

        With ``cloud_vm`` the guest runs inside that cloud VM (its region hot-plugged there;
        ``net`` gives it a NIC on the lab network, by default for Linux guests).
        """
        if cloud_vm is not None:
            await self.cloud.start_guest(name, cloud_vm, memory, image=image, touch=touch,
                                         net=net)
            return Guest(self, name)
        size = parse_size(memory)
        pct = parse_percent(touch)
        try:
            img = GuestImage(image)
        except ValueError:
            raise BadInputError(f"unknown image {image!r}: use test or linux") from None
        self.validate_new_guest(name, size)
        qemu_path = self.settings.resolve_qemu(qemu)
        accel = await resolve_accel(self.settings.accel, qemu_path, self.settings.images_dir,
                                    self.settings.state_dir)
        spec = MachineSpec(name, size, img, pct, accel, qemu_path, self.settings.images_dir,
                           backend)
        spec.boot_args()  # missing images are bad input: fail before recording anything
        rec = GuestRecord(name=name, image=img.value, memory=size, touch=pct, accel=accel,
                          qemu=qemu_path, state=GuestState.STARTING, backend=backend.value)
        self.store.add_guest(rec)  # reserves the name atomically
        try:
            with self.store.lock_guest(name):
                await self._launch(rec, spec)
        except BaseException:
            self.store.remove_guest(name)
            shutil.rmtree(self.store.state_dir / "guests" / name, ignore_errors=True)
            raise
        return Guest(self, name)

    async def _launch(self, rec: GuestRecord, spec: MachineSpec) -> None:
        qmp, serial, qlog = self.instance_paths(rec.name, 0)
        if spec.backend is RamBackend.REGION:
            with BeamRegion.create(spec.memory, rec.name) as region:
                argv = build_argv(spec, qmp_path=qmp, serial_path=serial, ram_fd=region.fd)
                proc = await QemuProcess.launch(argv, qmp, qlog, pass_fds=[region.fd])
                rec.region_id = region.region_id
        else:
            argv = build_argv(spec, qmp_path=qmp, serial_path=serial)
            proc = await QemuProcess.launch(argv, qmp, qlog)
        self.adopt(proc)
        rec.pid, rec.pid_start = proc.ref.pid, proc.ref.start_time
        rec.qmp_path, rec.serial_path, rec.log_path = str(qmp), str(serial), str(qlog)
        rec.state = GuestState.RUNNING
        self.store.update_guest(rec)

    async def guest(self, name: str) -> Guest:
        self.store.get_guest(name)
        return Guest(self, name)

    def guests(self) -> list[GuestRecord]:
        return self.store.guests()

    def spec_of(self, rec: GuestRecord, qemu: str | None = None) -> MachineSpec:
        return MachineSpec(rec.name, rec.memory, GuestImage(rec.image), rec.touch, rec.accel,
                           self.settings.resolve_qemu(qemu or rec.qemu),
                           self.settings.images_dir, RamBackend(rec.backend))

    async def status(self, name: str) -> GuestStatus:
        rec = self.store.get_guest(name)
        if rec.cloud_vm:
            return await self._nested_status(rec)
        proc = self.process(rec) if rec.pid else None
        alive = proc is not None and proc.alive()
        if not alive and rec.state is GuestState.RUNNING:
            # Died behind our back: record it rather than pretend.
            rec.state = GuestState.LOST
            self.store.update_guest(rec)
        run_state = None
        if alive and proc is not None:
            with contextlib.suppress(QMPCommandError):
                run_state = await proc.run_state()
        serial = read_status(Path(rec.serial_path))
        hb = serial.heartbeat
        return GuestStatus(
            name=rec.name, state=rec.state.value, image=rec.image, memory_bytes=rec.memory,
            touch_percent=rec.touch, accel=rec.accel, pid=rec.pid, alive=alive,
            run_state=run_state, booted=serial.booted, ready=serial.ready, heartbeat=hb,
            memory_ok=None if hb is None else hb.ok, region_id=rec.region_id,
            instance=rec.instance, serial_log=rec.serial_path)

    async def _nested_status(self, rec: GuestRecord) -> GuestStatus:
        st: dict[str, Any] = {}
        with contextlib.suppress(VmbeamError):
            st = await self.cloud.guest_status(rec)
        if st and not st["alive"] and rec.state is GuestState.RUNNING:
            # Its agent (or the cloud VM's end) says it is gone: record it, don't pretend.
            rec.state = GuestState.LOST
            self.store.update_guest(rec)
        hbd = st.get("heartbeat")
        hb = Heartbeat(**hbd) if hbd else None
        return GuestStatus(
            name=rec.name, state=rec.state.value, image=rec.image, memory_bytes=rec.memory,
            touch_percent=rec.touch, accel=rec.accel, pid=int(st.get("pid", rec.pid)),
            alive=bool(st.get("alive")), run_state=st.get("run_state"), booted=hb is not None,
            ready=hb is not None, heartbeat=hb, memory_ok=None if hb is None else hb.ok,
            region_id=rec.region_id, instance=rec.instance, serial_log="",
            cloud_vm=rec.cloud_vm, tenant=rec.tenant, ip=rec.ip)

    async def stop_guest(self, name: str, *, missing_ok: bool = False) -> None:
        """Quit the guest's QEMU (its region goes with it) and forget the guest."""
        try:
            rec = self.store.get_guest(name)
        except UnknownGuestError:
            if missing_ok:
                return
            raise
        if rec.cloud_vm:
            await self.cloud.stop_guest(name)
            return
        with self.store.lock_guest(name):
            if rec.pid:
                proc = self.process(rec)
                await proc.quit()
                self.forget(proc)
            self.store.remove_guest(name)
            shutil.rmtree(self.store.state_dir / "guests" / name, ignore_errors=True)

    async def stop_all(self) -> None:
        """Stop every guest and cloud VM of this state directory."""
        for rec in self.store.guests():
            await self.stop_guest(rec.name, missing_ok=True)
        for vm in self.store.cloud_vms():
            await self.cloud.stop_cloud_vm(vm.name)

    # -- migration ------------------------------------------------------------------------
    async def migrate(self, name: str, options: MigrationOptions | None = None
                      ) -> MigrationResult:
        """Move a running guest to a new QEMU process on this host."""
        return await migrate_local(self, name, options or MigrationOptions())

    async def recover(self) -> None:
        """Resolve migrations left unfinished by a command that died."""
        for mig in self.store.unfinished_migrations():
            # A busy guest's migration is still running in another command.
            with contextlib.suppress(GuestBusyError), self.store.lock_guest(mig.guest):
                try:
                    rec = self.store.get_guest(mig.guest)
                except UnknownGuestError:
                    self.store.journal(mig.id, MigrationPhase.FAILED,
                                       error="recovered: guest gone")
                    continue
                if rec.cloud_vm or mig.src_cloud_vm:
                    await self.cloud.recover(rec, mig)
                else:
                    await recover(self, rec, mig)
