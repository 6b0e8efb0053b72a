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
import math
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .accel import resolve_accel
from .cloudvm import (
    CLOUD_VM_CPUS,
    ROOT_PORT_WINDOW,
    ROOT_PORTS,
    CloudVMRecord,
    CloudVMState,
)
from .config import Accel, Settings, check_lab_network
from .errors import (
    BadInputError,
    DuplicateGuestError,
    GuestBusyError,
    QMPCommandError,
    UnknownGuestError,
    VmbeamError,
)
from .guest import Guest, GuestStatus
from .heartbeat import Heartbeat, read_status
from .migration import (
    MigrationMode,
    MigrationOptions,
    MigrationResult,
    migrate_local,
    recover,
)
from .nested import CloudOps
from .qemu.machine import GuestImage, MachineSpec, RamBackend, build_argv
from .qemu.process import ProcessRef, QemuProcess
from .region import BeamRegion
from .store import GuestRecord, GuestState, MigrationPhase, Store
from .units import PAGE_SIZE, check_name, format_size, parse_percent, parse_size, shown

if TYPE_CHECKING:
    from .net import LabNetwork

log = logging.getLogger(__name__)

MIN_MEMORY = 32 << 20
# A floor far below the lab's 2G: smaller sizes (0, "256" meant as MiB) are refused as the
# typos they are rather than left to time out booting Debian, python3 and an L2 QEMU.
MIN_CLOUD_VM_MEMORY = 256 << 20
MAX_CPUS = 64
# A cloud VM's tap is "tap-<name>" and interface names hold 15 characters: longer names
# would collide once cut.
CLOUD_VM_NAME_MAX = 11
_MAX_SOCKET_PATH = 107
# Room for the instance number in "qmp-<instance>.sock": it grows with every migration.
_INSTANCE_DIGITS = 6


def _check_size(memory: int | str, minimum: int, what: str) -> int:
    """Parse a RAM size and refuse it unless page-aligned, at least ``minimum`` and no more
    than the host has available; ``what`` names it in the error."""
    size = parse_size(memory)
    if size % PAGE_SIZE:
        raise BadInputError(f"{what} {size} is not a multiple of the page size "
                            f"({PAGE_SIZE} bytes)")
    if size < minimum:
        raise BadInputError(f"{what} {format_size(size)} is below the minimum of "
                            f"{minimum >> 20} MiB")
    avail = mem_available()
    if size > avail:
        raise BadInputError(f"{what} {size >> 20} MiB exceeds the host's available "
                            f"memory ({avail >> 20} MiB)")
    return size


def check_guest_memory(memory: int | str, *, in_cloud_vm: bool = False) -> int:
    """Parse and check a new guest's RAM size; raise :class:`BadInputError` if unusable.

    In a cloud VM the region (RAM + identity page) is rounded up to a power of two and must
    fit one hot-plug root port's 64-bit window.
    """
    size = parse_size(memory)
    if in_cloud_vm and size % PAGE_SIZE == 0 and size >= MIN_MEMORY:
        window = parse_size(ROOT_PORT_WINDOW)
        region = 1 << (size + PAGE_SIZE - 1).bit_length()
        if region > window:
            raise BadInputError(f"memory size {format_size(size)} does not fit a cloud VM: its "
                                f"region ({format_size(region)}, RAM + identity page rounded "
                                f"up to a power of two) exceeds the {ROOT_PORT_WINDOW} "
                                f"hot-plug window")
    return _check_size(size, MIN_MEMORY, "memory size")


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

    async def disconnect(self) -> None:
        """Let go of every QMP session and agent channel (both serve one client at a time),
        so that another command can use them; they reconnect on next use."""
        if self._cloud is not None:
            await self._cloud.close()
        for proc in self._procs.values():
            await proc.close()

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
    def validate_name(name: str, what: str = "name") -> None:
        check_name(name, what)

    def _check_socket_path(self, path: Path) -> None:
        if len(str(path)) > _MAX_SOCKET_PATH:
            raise BadInputError(f"state directory path too long for a unix socket: {path} "
                                f"({len(str(path))} > {_MAX_SOCKET_PATH} bytes)")

    def validate_new_guest(self, name: str, memory: int, *, in_cloud_vm: bool = False) -> None:
        """Refuse a new guest's name and size before anything is recorded or started."""
        self.validate_name(name)
        check_guest_memory(memory, in_cloud_vm=in_cloud_vm)
        if not in_cloud_vm:
            self._check_socket_path(self.store.state_dir / "guests" / name
                                    / f"qmp-{'9' * _INSTANCE_DIGITS}.sock")
        with contextlib.suppress(UnknownGuestError):
            self.store.get_guest(name)
            raise DuplicateGuestError(f"a guest named {name!r} already exists")

    def check_new_guest(self, name: str, memory: int | str, *, image: str = "test",
                        touch: int | str = 70, qemu: str | None = None,
                        backend: RamBackend = RamBackend.REGION,
                        cloud_vm: str | None = None) -> tuple[int, int, GuestImage]:
        """Every check :meth:`start_guest` makes before it writes or starts anything:
        returns (memory bytes, touch percent, image) or raises :class:`BadInputError`."""
        size = parse_size(memory)
        pct = parse_percent(touch)
        try:
            img = GuestImage(image)
        except ValueError:
            raise BadInputError(f"unknown image {shown(image)}: use test or linux") from None
        if not isinstance(backend, RamBackend):
            raise BadInputError(f"unknown RAM backend {shown(backend)}")
        self.validate_new_guest(name, size, in_cloud_vm=cloud_vm is not None)
        if cloud_vm is None:
            qemu_path = self.settings.resolve_qemu(qemu)
            # Missing images, like the rest, are refused before anything is recorded.
            MachineSpec(name, size, img, pct, "tcg", qemu_path, self.settings.images_dir,
                        backend).boot_args()
            if self.settings.accel is Accel.KVM and not os.access("/dev/kvm",
                                                                  os.R_OK | os.W_OK):
                raise BadInputError("--accel kvm requested but /dev/kvm is not usable")
            return size, pct, img
        if qemu is not None or backend is not RamBackend.REGION:
            raise BadInputError("a guest in a cloud VM runs the cloud VM's QEMU on a beam "
                                "region: qemu and backend apply to guests on this host")
        vm = self._cloud_vm(cloud_vm)
        if vm.state is not CloudVMState.RUNNING or not self.cloud.l1(vm).alive():
            raise BadInputError(f"cloud VM {cloud_vm!r} is not running ({vm.state.value})")
        if len(vm.attachments) >= ROOT_PORTS:
            raise BadInputError(f"cloud VM {cloud_vm!r} has no free hot-plug slot (it holds "
                                f"{ROOT_PORTS} regions)")
        return size, pct, img

    def _cloud_vm(self, name: str) -> CloudVMRecord:
        if not isinstance(name, str):
            raise BadInputError(f"no cloud VM named {shown(name)}")
        return self.store.get_cloud_vm(name)

    def validate_new_cloud_vm(self, name: str, tenant: str, memory: int | str, cpus: int,
                              lab: LabNetwork | None = None) -> int:
        """Refuse a new cloud VM before anything is recorded, created or started; returns
        its memory in bytes."""
        check_name(name, "cloud VM name", CLOUD_VM_NAME_MAX)
        if not tenant:
            raise BadInputError("a cloud VM needs a tenant")
        check_name(tenant, "tenant")
        size = _check_size(memory, MIN_CLOUD_VM_MEMORY, "cloud VM memory")
        if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= MAX_CPUS:
            raise BadInputError(f"invalid CPU count {shown(cpus)}: use 1-{MAX_CPUS}")
        if lab is not None:
            check_lab_network(lab.ns, lab.subnet)
        d = self.store.state_dir / "cloudvms" / name
        self._check_socket_path(d / "agent.sock")
        try:
            self.store.get_cloud_vm(name)
        except BadInputError:
            return size  # no such cloud VM yet: the name is free
        raise BadInputError(f"a cloud VM named {name!r} already exists")

    async def start_cloud_vm(self, name: str, tenant: str, memory: int | str = "2G",
                             cpus: int = CLOUD_VM_CPUS,
                             lab: LabNetwork | None = None) -> CloudVMRecord:
        """Boot a cloud VM of ``tenant`` (on ``lab``) and wait for its agent."""
        self.validate_new_cloud_vm(name, tenant, memory, cpus, lab)
        return await self.cloud.start_cloud_vm(name, tenant, memory, cpus, lab=lab)

    async def start_guest(self, name: str, memory: int | str, *, image: str = "test",
                          touch: int | str = 70, qemu: str | None = None,
                          backend: RamBackend = RamBackend.REGION,
                          cloud_vm: str | None = None, net: bool | None = None) -> Guest:
        """Start a guest whose RAM is a new beam region; returns once QEMU answers QMP.

        With ``cloud_vm`` the guest runs inside that cloud VM (its region hot-plugged there;
        ``net`` gives it a NIC on the lab network, by default for Linux guests).
        """
        # All of it checked before anything is recorded, created or started.
        size, pct, img = self.check_new_guest(name, memory, image=image, touch=touch,
                                              qemu=qemu, backend=backend, cloud_vm=cloud_vm)
        if cloud_vm is not None:
            await self.cloud.start_guest(name, cloud_vm, size, image=image, touch=pct,
                                         net=net)
            return Guest(self, name)
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
        opts = options or MigrationOptions()
        self.check_migration(name, opts)
        return await migrate_local(self, name, opts)

    def check_migration(self, name: str, opts: MigrationOptions) -> None:
        """Refuse a local migration's bad arguments before its lock, journal or QEMU."""
        if not isinstance(opts.mode, MigrationMode):
            raise BadInputError(f"unknown migration mode {shown(opts.mode)}")
        timeout = opts.timeout
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, int | float)
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise BadInputError(f"invalid timeout {shown(timeout)}: use a positive number of "
                                f"seconds")
        rec = self.store.get_guest(name)  # an unknown guest gets no lock file either
        if rec.cloud_vm:
            raise BadInputError(f"guest {name!r} runs in cloud VM {rec.cloud_vm!r}, not on "
                                f"this host: move it with --to (Guest.move_to)")
        # migrate_local checks these again under the guest's lock; here they come first.
        if rec.state is GuestState.MIGRATING:
            raise GuestBusyError(f"guest {name!r} is busy: a migration of it is in flight")
        if rec.state is not GuestState.RUNNING:
            raise BadInputError(f"guest {name!r} is {rec.state.value}; only a running guest "
                                f"can be migrated")
        backend = RamBackend(rec.backend)
        if (opts.mode is MigrationMode.CPR_TRANSFER) != (backend is RamBackend.MEMFD):
            raise BadInputError(f"mode {opts.mode.value} does not fit guest {name!r} (RAM "
                                f"backend {backend.value}); cpr-transfer needs a memfd guest")
        if opts.qemu is not None:
            self.settings.resolve_qemu(opts.qemu)

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
