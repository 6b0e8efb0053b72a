"""The host: the entry point of the Python API and of every CLI command.

A :class:`Host` owns one state directory (store, sockets, logs) and starts, finds, stops and
moves the guests recorded there — a façade: it checks requests, picks the guest's placement
(:mod:`vmbeam_kvm.placement`) and hands moves to the migration engine
(:mod:`vmbeam_kvm.migrate`). Opening it resolves any move that a crashed command left
half-done, before anything else touches the guests.

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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from . import disks as disk_files
from .accel import AccelVerdict, resolve_accel, verdict
from .checks import (
    CLOUD_VM_NAME_MAX,
    MIN_CLOUD_VM_MEMORY,
    MIN_MEMORY,
    check_cpus,
    check_guest_memory,
    check_movable,
    check_new_cloud_vm,
    check_new_guest,
    check_tail_window,
    mem_available,
)
from .cloudvm import CLOUD_VM_CPUS, ROOT_PORTS, CloudVMRecord, CloudVMState
from .config import Accel, Settings
from .errors import BadInputError, GuestBusyError, UnknownGuestError
from .evacuate import Evacuation, Rejuvenation, evacuate, rejuvenate
from .guest import Guest, GuestStatus
from .hosts import HostIdentity, Hosts, local_identity
from .migrate import (
    SettleResult,
    choose_mode,
    migrate_between,
    migrate_local,
    recover_move,
    settle_guest,
)
from .migrate.model import MigrationMode, MigrationOptions, MigrationResult
from .migrate.settle import check_settleable
from .placement import Placement
from .placement.cloud import CloudOps
from .placement.local import LocalPlacement
from .qemu.machine import GuestImage, MachineSpec, RamBackend
from .qemu.process import QemuProcess, kill_strays
from .region import check_huge_pages
from .runtime import Runtime, to_the_end
from .seed import read_user_data, seed_disk
from .store import GuestRecord, GuestState, MigrationPhase, Store
from .units import check_name, parse_percent, parse_size, shown

if TYPE_CHECKING:
    from .net import LabNetwork

log = logging.getLogger(__name__)

__all__ = ["CLOUD_VM_NAME_MAX", "MIN_CLOUD_VM_MEMORY", "MIN_MEMORY", "CloudVMs", "Host",
           "check_guest_memory", "check_huge_pages", "check_tail_window", "mem_available"]


class CloudVMs(CloudOps):
    """The host's cloud VMs and the guests in them (``host.cloud``), with moves between
    them."""

    async def migrate(self, name: str, to: str, mode: MigrationMode | None = None, *,
                      options: MigrationOptions | None = None) -> MigrationResult:
        """Move guest ``name`` into cloud VM ``to`` (``mode`` None = auto: zero-copy, as
        both cloud VMs are on this host)."""
        opts = options or MigrationOptions(mode=mode or MigrationMode.AUTO)
        return await migrate_between(self, name, to, opts)


class Host:
    """vmbeam-kvm on this machine: guests, their regions and their moves."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._rt: Runtime | None = None
        self._local: LocalPlacement | None = None
        self._cloud: CloudVMs | None = None

    @property
    def rt(self) -> Runtime:
        if self._rt is None:
            raise RuntimeError("Host is not open: use `async with Host(...)`")
        return self._rt

    @property
    def store(self) -> Store:
        return self.rt.store

    @property
    def local(self) -> LocalPlacement:
        """Guests whose QEMU runs on this host."""
        if self._local is None:
            self._local = LocalPlacement(self.rt)
        return self._local

    @property
    def cloud(self) -> CloudVMs:
        """Cloud VMs (L1) on this host and the guests inside them."""
        if self._cloud is None:
            self._cloud = CloudVMs(self.rt)
        return self._cloud

    @property
    def hosts(self) -> Hosts:
        """Other L0 hosts, reached over SSH (``host add/list/remove``)."""
        return Hosts(self.store, self.settings.state_dir)

    def identity(self) -> HostIdentity:
        """This L0's identity: machine id, boot id, store id (co-location is decided on
        these, never on a name)."""
        return local_identity(self.settings.state_dir)

    def placement(self, rec: GuestRecord) -> Placement:
        """Where ``rec`` runs: in a cloud VM, or on this host."""
        return self.cloud if rec.cloud_vm else self.local

    async def __aenter__(self) -> Host:
        store = Store(self.settings.state_dir)
        self._rt = Runtime(store, self.settings)
        try:
            await self.recover()
            self.cloud.reap()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._cloud is not None:
            await self._cloud.close()
            self._cloud = None
        self._local = None
        if self._rt is not None:
            await self._rt.procs.close()
            self._rt.store.close()
            self._rt = None

    async def disconnect(self) -> None:
        """Let go of every QMP session and agent channel (both serve one client at a time),
        so that another command can use them; they reconnect on next use."""
        if self._cloud is not None:
            await self._cloud.close()
        await self.rt.procs.disconnect()

    def process(self, rec: GuestRecord) -> QemuProcess:
        """The QEMU process on this host that currently runs ``rec``."""
        return self.local.process(rec)

    async def accel(self, *, reprobe: bool = False) -> tuple[str, str, AccelVerdict]:
        """(guest accel, cloud-VM accel, the measured verdict) that this host's settings
        mean; ``reprobe`` measures again instead of reading the cache."""
        s = self.settings
        qemu = s.resolve_qemu()
        found = await verdict(qemu, s.images_dir, s.state_dir, reprobe=reprobe)
        return (await resolve_accel(s.accel, qemu, s.images_dir, s.state_dir),
                await resolve_accel(s.accel, qemu, s.images_dir, s.state_dir, cloud_vm=True),
                found)

    # -- guests ---------------------------------------------------------------------------
    def validate_new_guest(self, name: str, memory: int, *, in_cloud_vm: bool = False) -> None:
        """Refuse a new guest's name and size before anything is recorded or started."""
        check_new_guest(self.store, name, memory, in_cloud_vm=in_cloud_vm)

    def check_new_guest(self, name: str, memory: int | str, *, image: str | None = None,
                        touch: int | str = 70, qemu: str | None = None,
                        backend: RamBackend = RamBackend.REGION,
                        cloud_vm: str | None = None,
                        hugepages: bool = False, cpus: int = 1,
                        disks: list[str] | tuple[str, ...] = (),
                        disk_in_place: bool = False,
                        cloud_init: str | None = None) -> tuple[int, int, GuestImage]:
        """Every check :meth:`start_guest` makes before it writes or starts anything:
        returns (memory bytes, touch percent, image) or raises :class:`BadInputError`."""
        size = parse_size(memory)
        pct = parse_percent(touch)
        img = GuestImage.resolve(image, bool(disks))
        if cloud_init is not None:
            read_user_data(cloud_init)
            if img is not GuestImage.DISK:
                raise BadInputError("--cloud-init seeds the guest's own OS: it applies to a "
                                    "guest that boots its first disk (--image disk)")
            if len(disks) >= disk_files.MAX_DISKS:
                raise BadInputError(f"--cloud-init adds a disk (its seed): at most "
                                    f"{disk_files.MAX_DISKS - 1} --disk with it")
        if not isinstance(backend, RamBackend):
            raise BadInputError(f"unknown RAM backend {shown(backend)}")
        check_new_guest(self.store, name, size, in_cloud_vm=cloud_vm is not None)
        check_cpus(cpus)
        self.check_disks(disks, in_place=disk_in_place, beam=cloud_vm is not None)
        if cloud_vm is None:
            qemu_path = self.settings.resolve_qemu(qemu)
            # Missing images, like the rest, are refused before anything is recorded.
            MachineSpec(name, size, img, pct, "tcg", qemu_path, self.settings.images_dir,
                        backend).boot_args()
            if self.settings.accel is Accel.KVM and not os.access("/dev/kvm",
                                                                  os.R_OK | os.W_OK):
                raise BadInputError("--accel kvm requested but /dev/kvm is not usable")
            if hugepages:
                if backend is not RamBackend.REGION:
                    raise BadInputError("--hugepages applies to beam-region guests")
                check_huge_pages(size)
            return size, pct, img
        if hugepages:
            raise BadInputError("--hugepages applies to guests on this host: a cloud VM "
                                "maps its guests' regions as PCI BARs of its own")
        if qemu is not None or backend is not RamBackend.REGION:
            raise BadInputError("a guest in a cloud VM runs the cloud VM's QEMU on a beam "
                                "region: qemu and backend apply to guests on this host")
        vm = self._cloud_vm(cloud_vm)
        if vm.state is not CloudVMState.RUNNING or not self.cloud.l1(vm).alive():
            raise BadInputError(f"cloud VM {cloud_vm!r} is not running ({vm.state.value})")
        if vm.free_slots() <= 0:
            raise BadInputError(f"cloud VM {cloud_vm!r} has no free hot-plug slot (it holds "
                                f"{ROOT_PORTS} regions)")
        return size, pct, img

    def check_disks(self, paths: list[str] | tuple[str, ...], *, in_place: bool = False,
                    beam: bool = False) -> list[tuple[Path, str, bool]]:
        """Refuse a new guest's disks (missing, unknown format, in use; ``beam``: for a
        guest in a cloud VM); returns them checked (absolute path, format, O_DIRECT)."""
        if not isinstance(paths, list | tuple):
            raise BadInputError(f"disks must be a list of paths, not {shown(paths)}")
        taken = {d.user_file: (r.name, d.mode == disk_files.DiskMode.IN_PLACE)
                 for r in self.store.guests() for d in disk_files.loads(r.disks)}
        return disk_files.check_disks(list(paths), in_place=in_place, taken=taken, beam=beam)

    def _cloud_vm(self, name: str) -> CloudVMRecord:
        if not isinstance(name, str):
            raise BadInputError(f"no cloud VM named {shown(name)}")
        return self.store.get_cloud_vm(name)

    def validate_new_cloud_vm(self, name: str, tenant: str, memory: int | str, cpus: int,
                              lab: LabNetwork | None = None) -> int:
        """Refuse a new cloud VM before anything is recorded, created or started; returns
        its memory in bytes."""
        return check_new_cloud_vm(self.store, name, tenant, memory, cpus, lab)

    @staticmethod
    def validate_name(name: str, what: str = "name") -> None:
        check_name(name, what)

    async def start_cloud_vm(self, name: str, tenant: str, memory: int | str = "2G",
                             cpus: int = CLOUD_VM_CPUS,
                             lab: LabNetwork | None = None) -> CloudVMRecord:
        """Boot a cloud VM of ``tenant`` (on ``lab``) and wait for its agent."""
        self.validate_new_cloud_vm(name, tenant, memory, cpus, lab)
        if lab is not None:  # another state directory's lab is refused before any record
            lab.check_owner(await lab.owner_of())
        return await self.cloud.start_cloud_vm(name, tenant, memory, cpus, lab=lab)

    async def start_guest(self, name: str, memory: int | str, *, image: str | None = None,
                          touch: int | str = 70, qemu: str | None = None,
                          backend: RamBackend = RamBackend.REGION,
                          cloud_vm: str | None = None, net: bool | None = None,
                          hugepages: bool = False, cpus: int = 1,
                          disks: list[str] | tuple[str, ...] = (),
                          disk_in_place: bool = False, cloud_init: str | None = None) -> Guest:
        """Start a guest whose RAM is a new beam region; returns once QEMU answers QMP.

        With ``cloud_vm`` the guest runs inside that cloud VM (its region hot-plugged there;
        ``net`` gives it a NIC on the lab network, by default for Linux guests;
        ``hugepages`` backs its region with the host's reserved huge pages; ``cpus`` is its
        vCPU count, 1-64, in either topology; ``disks`` are qcow2/raw files on this host,
        each behind a qcow2 overlay in the guest's state directory unless
        ``disk_in_place``: see :mod:`vmbeam_kvm.disks`; in a cloud VM they are beam disks,
        L0's files hot-plugged there); ``cloud_init``: a user-data file, given to the
        guest's own OS (``image`` disk) as a NoCloud seed, its last disk (:mod:`.seed`).
        Raises BadInputError (nothing changed) or LaunchError (everything started is undone).
        """
        # All of it checked before anything is recorded, created or started.
        size, pct, img = self.check_new_guest(name, memory, image=image, touch=touch,
                                              qemu=qemu, backend=backend, cloud_vm=cloud_vm,
                                              hugepages=hugepages, cpus=cpus, disks=disks,
                                              disk_in_place=disk_in_place,
                                              cloud_init=cloud_init)
        user_data = None if cloud_init is None else read_user_data(cloud_init)
        if cloud_vm is not None:
            await self.cloud.start_guest(name, cloud_vm, size, image=img.value, touch=pct,
                                         net=net, cpus=cpus,
                                         disks=self.check_disks(disks, in_place=disk_in_place,
                                                                beam=True),
                                         disk_in_place=disk_in_place, user_data=user_data)
            return Guest(self, name)
        qemu_path = self.settings.resolve_qemu(qemu)
        accel = await resolve_accel(self.settings.accel, qemu_path, self.settings.images_dir,
                                    self.settings.state_dir)
        spec = MachineSpec(name, size, img, pct, accel, qemu_path, self.settings.images_dir,
                           backend, cpus=cpus)
        spec.boot_args()  # missing images are bad input: fail before recording anything
        rec = GuestRecord(name=name, image=img.value, memory=size, touch=pct, accel=accel,
                          qemu=qemu_path, state=GuestState.STARTING, backend=backend.value,
                          cpus=cpus)
        checked = self.check_disks(disks, in_place=disk_in_place)
        self.store.add_guest(rec)  # reserves the name atomically
        try:
            with self.store.lock_guest(name):
                if user_data is not None:
                    checked.append(seed_disk(self.store.guest_dir(name), name=name,
                                             user_data=user_data))
                if checked:
                    made = disk_files.new_disks(self.store.guest_dir(name), checked,
                                                in_place=disk_in_place)
                    rec.disks = disk_files.dumps(made)
                    spec = replace(spec, disks=made)
                await self.local.start(rec, spec, huge=hugepages)
        except BaseException:
            kill_strays(self.store.guest_dir(name))  # its directory goes: nothing may run there
            self.store.remove_guest(name)
            shutil.rmtree(self.store.state_dir / "guests" / name, ignore_errors=True)
            raise
        return Guest(self, name)

    async def guest(self, name: str) -> Guest:
        self.store.get_guest(name)
        return Guest(self, name)

    def guests(self) -> list[GuestRecord]:
        return self.store.guests()

    async def status(self, name: str) -> GuestStatus:
        """The guest's status, never waiting for another command: a guest another command
        holds (a move in flight) is reported from its record, marked ``busy``."""
        rec = self.store.get_guest(name)
        busy = self.store.guest_locked(name)
        if busy:
            rec = self.store.get_guest(name)  # what the other command recorded last
        return await self.placement(rec).status(rec, busy=busy)

    async def stop_guest(self, name: str, *, missing_ok: bool = False) -> None:
        """Quit the guest's QEMU (its region goes with it) and forget the guest."""
        try:
            rec = self.store.get_guest(name)
        except UnknownGuestError:
            if missing_ok:
                return
            raise
        await to_the_end(self.placement(rec).stop(rec))

    async def settle_guest(self, name: str) -> SettleResult:
        """Settle a guest a move left ``needs-action`` or ``unreachable``: look at both ends
        of its last move, keep the one copy that runs with a good memory verdict (its
        heartbeat advancing), stop the other, release what it held; the guest is running
        and movable again. Raises BadInputError (exit 2) for a guest in another state,
        SettleRefusedError (exit 4, nothing changed, both ends' state in the message) where
        it cannot tell, GuestLostError where no copy is left."""
        # Refused before its lock file (nothing changed), and again under the lock.
        check_settleable(self.store.get_guest(name))
        with self.store.lock_guest(name, "settled"):
            return await settle_guest(self.local, self.cloud, self.store.get_guest(name))

    async def stop_all(self) -> None:
        """Stop every guest and cloud VM of this state directory."""
        for rec in self.store.guests():
            await self.stop_guest(rec.name, missing_ok=True)
        for vm in self.store.cloud_vms():
            await self.cloud.stop_cloud_vm(vm.name)
        self.sweep()

    def sweep(self) -> list[int]:
        """Kill the QEMUs of this state directory that no record names (their command died
        before it could record or remove them; found by pidfile); their pids."""
        known = {("guests", g.name) for g in self.store.guests()}
        known |= {("cloudvms", v.name) for v in self.store.cloud_vms()}
        killed = []
        for kind in ("guests", "cloudvms"):
            top = self.store.state_dir / kind
            if top.is_dir():
                for d in top.iterdir():
                    if (kind, d.name) not in known:
                        killed += kill_strays(d)
        if killed:
            log.warning("killed QEMU processes no record named: %s", killed)
        return killed

    # -- moves ----------------------------------------------------------------------------
    async def evacuate(self, cloud_vm: str, to: list[str] | None = None, *,
                       parallel: int | None = None,
                       progress: Callable[[str], None] | None = None) -> Evacuation:
        """Move every guest out of ``cloud_vm``, zero-copy, several at once (into ``to``
        or any cloud VM of its tenant with free slots); see :mod:`vmbeam_kvm.evacuate`."""
        return await evacuate(self.cloud, cloud_vm, to, parallel=parallel, progress=progress)

    async def rejuvenate(self, cloud_vm: str, to: list[str] | None = None, *,
                         parallel: int | None = None,
                         progress: Callable[[str], None] | None = None) -> Rejuvenation:
        """Evacuate ``cloud_vm``, boot it again fresh and move its guests back."""
        return await rejuvenate(self.cloud, cloud_vm, to, parallel=parallel,
                              progress=progress)

    async def migrate(self, name: str, options: MigrationOptions | None = None
                      ) -> MigrationResult:
        """Move a running guest to a new QEMU process on this host."""
        opts = options or MigrationOptions()
        self.check_migration(name, opts)
        return await migrate_local(self.local, name, opts)

    async def move(self, name: str, to: str, mode: MigrationMode | None = None
                   ) -> MigrationResult:
        """Move a guest in a cloud VM into cloud VM ``to`` (``mode`` None = auto)."""
        return await self.cloud.migrate(name, to, mode)

    def check_migration(self, name: str, opts: MigrationOptions) -> None:
        """Refuse a local move's bad arguments before its lock, journal or QEMU."""
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
        check_movable(rec)
        backend = RamBackend(rec.backend)
        if opts.mode is MigrationMode.AUTO:
            opts = choose_mode(opts, rec)[0]  # what the move will check under its lock
        if (opts.mode is MigrationMode.CPR_TRANSFER) != (backend is RamBackend.MEMFD):
            raise BadInputError(f"mode {opts.mode.value} does not fit guest {name!r} (RAM "
                                f"backend {backend.value}); cpr-transfer needs a memfd guest")
        if opts.mode is MigrationMode.PRECOPY:
            disk_files.check_copy(name, disk_files.loads(rec.disks))
        if opts.qemu is not None:
            self.settings.resolve_qemu(opts.qemu)
        check_tail_window(opts.tail_window)
        if opts.prefault and opts.mode is not MigrationMode.ZERO_COPY:
            raise BadInputError("--prefault applies to zero-copy moves (the destination "
                                "maps the guest's memory before the switch)")

    async def recover(self) -> None:
        """Resolve moves left unfinished by a command that died."""
        for mig in self.store.unfinished_migrations():
            # A busy guest's move is still running in another command.
            with contextlib.suppress(GuestBusyError), self.store.lock_guest(mig.guest):
                try:
                    rec = self.store.get_guest(mig.guest)
                except UnknownGuestError:
                    self.store.journal(mig.id, MigrationPhase.FAILED,
                                       error="recovered: guest gone")
                    continue
                await recover_move(self.local, self.cloud, rec, mig)
