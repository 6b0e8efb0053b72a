"""Local migration: moving a running guest to a new QEMU process on this host.

Three modes share one journaled phase machine (:class:`~vmbeam_kvm.store.MigrationPhase`):

* ``zero-copy`` — the destination maps the guest's beam region; with ``x-ignore-shared`` only
  device state crosses the socket (VMBeam's share → switch → relocate);
* ``precopy`` — the destination gets a fresh region and QEMU copies all RAM (the fallback and
  the yardstick);
* ``cpr-transfer`` — QEMU's own local live-update peer, for guests started with QEMU's memfd
  backend (used by the benchmark as the stock comparison).

Safety rules (DESIGN §4.4, §4.6): the destination's region identity is verified through the
destination's own fd before any switch; ``return-path`` makes the source wait for the
destination to load; the destination is confirmed ``running`` before the source quits; a
source whose migration completed is never resumed. Any failure before the switch kills the
destination and leaves the source running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    BadInputError,
    GuestLostError,
    LaunchError,
    MigrationError,
    QMPCommandError,
    RegionError,
    UnsafeStateError,
    VmbeamError,
)
from .heartbeat import read_status, wait_for_heartbeat
from .pagemap import FrameComparison, compare_frames, find_memfd_inode
from .qemu.machine import RAM_ID, RamBackend, build_argv
from .qemu.process import ProcessRef, QemuProcess, cpu_seconds, host_memory_bytes
from .region import BeamRegion, read_identity_of
from .store import GuestRecord, GuestState, MigrationPhase, MigrationRecord

if TYPE_CHECKING:
    from .host import Host

# Test hook: make the command die right after journaling a phase (crash-recovery tests).
CRASH_ENV = "VMBEAM_TEST_CRASH_AFTER"


class MigrationMode(StrEnum):
    """How guest RAM reaches the destination."""

    ZERO_COPY = "zero-copy"
    PRECOPY = "precopy"
    CPR_TRANSFER = "cpr-transfer"


@dataclass
class MigrationOptions:
    """Knobs of one migration; the ``dest_region``/``before_switch`` hooks are for tests."""

    mode: MigrationMode = MigrationMode.ZERO_COPY
    qemu: str | None = None              # destination QEMU binary (live update)
    timeout: float | None = None         # limit before the switch; default depends on size
    max_bandwidth: int = 64 << 30        # precopy: QEMU's 128 MiB/s default is far too low
    verify_guest: bool = True            # wait for a good heartbeat on the destination
    guest_timeout: float = 30.0
    compare_frames: bool = True
    dest_region: BeamRegion | None = None
    before_switch: Callable[[QemuProcess], Awaitable[None]] | None = None
    # After the source completed, before the destination is confirmed running.
    after_switch: Callable[[QemuProcess], Awaitable[None]] | None = None


@dataclass
class MigrationResult:
    """What a migration did and what it cost; ``to_json`` is the CLI's ``--json`` object."""

    guest: str
    mode: str
    status: str
    total_ms: float
    downtime_ms: float | None
    ram_transferred_bytes: int
    shared_frames_ratio: float | None
    guest_ok: bool | None
    qemu_total_ms: float | None = None
    setup_ms: float = 0.0
    phases_ms: dict[str, float] = field(default_factory=dict)
    frames: dict[str, int] | None = None
    peak_qemu_memory_bytes: int = 0
    qemu_cpu_seconds: float = 0.0
    source_pid: int = 0
    dest_pid: int = 0
    migration_id: int = 0
    memory_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Rollback(Exception):
    """Internal to the engines (local and nested): the migration failed before the switch;
    the caller rolls back to the source."""


class _Sampler:
    """Samples the host memory held by the QEMU processes involved, to report the peak."""

    def __init__(self, procs: list[QemuProcess]) -> None:
        self.procs = procs
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        self.peak = max(self.peak, host_memory_bytes([p.pid for p in self.procs if p.alive()]))

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def crash_point(phase: MigrationPhase) -> None:
    if os.environ.get(CRASH_ENV) == phase.value:
        os._exit(99)


async def ram_fd_of(proc: QemuProcess) -> int:
    """The fd number through which ``proc`` maps guest RAM (``mem-path=/proc/self/fd/N``)."""
    path = await proc.execute("qom-get", {"path": f"/objects/{RAM_ID}", "property": "mem-path"})
    m = re.fullmatch(r"/proc/self/fd/(\d+)", str(path))
    if not m:
        raise RegionError(f"QEMU {proc.pid} maps guest RAM from {path!r}, not a beam region")
    return int(m.group(1))


async def migrate_local(host: Host, name: str, opts: MigrationOptions) -> MigrationResult:
    """Migrate guest ``name`` to a new QEMU on this host (see module docstring)."""
    store = host.store
    with store.lock_guest(name, "migrated"):
        rec = store.get_guest(name)
        if rec.state is not GuestState.RUNNING:
            raise BadInputError(f"guest {name!r} is {rec.state.value}; only a running guest "
                                f"can be migrated")
        src = host.process(rec)
        if not src.alive():
            rec.state = GuestState.LOST
            store.update_guest(rec)
            raise BadInputError(f"guest {name!r}: its QEMU (pid {rec.pid}) is gone")
        backend = RamBackend(rec.backend)
        if (opts.mode is MigrationMode.CPR_TRANSFER) != (backend is RamBackend.MEMFD):
            raise BadInputError(f"mode {opts.mode.value} does not fit guest {name!r} (RAM "
                                f"backend {backend.value}); cpr-transfer needs a memfd guest")
        spec = host.spec_of(rec, opts.qemu)
        run_state = await src.run_state()
        if run_state != "running":
            raise BadInputError(f"guest {name!r} is {run_state}, not running")
        mig_id = store.begin_migration(name, opts.mode.value, rec.pid, rec.pid_start)
        rec.state = GuestState.MIGRATING
        store.update_guest(rec)
        run = _LocalRun(host, rec, src, opts, mig_id)
        return await run.execute(spec)


class _LocalRun:
    """One execution of the phase machine for one guest."""

    def __init__(self, host: Host, rec: GuestRecord, src: QemuProcess,
                 opts: MigrationOptions, mig_id: int) -> None:
        self.host, self.rec, self.src, self.opts, self.mig_id = host, rec, src, opts, mig_id
        self.store = host.store
        self.dst: QemuProcess | None = None
        self.phases: dict[str, float] = {}
        self._mark = time.monotonic()
        self.sampler = _Sampler([src])
        self._dst_fd: int | None = None  # the destination's region fd, once verified
        self._cpr_channels: list[dict[str, Any]] = []
        self._cpr_main: Path | None = None
        # Set the moment this run asks the source to migrate: before it, no handover can
        # have happened, whatever the source's query-migrate says (DESIGN §7.15).
        self.switch_started = False

    def _phase_done(self, phase: MigrationPhase) -> None:
        now = time.monotonic()
        self.phases[phase.value] = round((now - self._mark) * 1000, 3)
        self._mark = now

    def _timeout(self) -> float:
        if self.opts.timeout is not None:
            return self.opts.timeout
        if self.opts.mode is MigrationMode.PRECOPY:
            return 60.0 + 30.0 * self.rec.memory / (1 << 30)
        return 30.0

    async def execute(self, spec: Any) -> MigrationResult:
        name, mode = self.rec.name, self.opts.mode
        src_region: BeamRegion | None = None
        dst_region: BeamRegion | None = None
        cpu0 = cpu_seconds(self.src.pid)
        self.sampler.start()
        try:
            # ---- PREPARE: destination QEMU on the (shared or new) region ----------------
            t_prepare = time.monotonic()
            inst = self.rec.instance + 1
            qmp, serial, qlog = self.host.instance_paths(name, inst)
            gdir = self.store.guest_dir(name)
            main_sock, cpr_sock = gdir / f"mig-{inst}.sock", gdir / f"cpr-{inst}.sock"
            for s in (main_sock, cpr_sock):
                with contextlib.suppress(FileNotFoundError):
                    s.unlink()
            try:
                if mode is MigrationMode.CPR_TRANSFER:
                    chan = {"channel-type": "cpr", "addr": {"transport": "socket",
                                                            "type": "unix",
                                                            "path": str(cpr_sock)}}
                    argv = build_argv(spec, qmp_path=qmp, serial_path=serial,
                                      incoming=[json.dumps(chan), "defer"])
                    self.dst = await QemuProcess.launch(argv, qmp, qlog, connect=False)
                else:
                    src_region = BeamRegion.open_from_process(
                        self.src.pid, await ram_fd_of(self.src), self.rec.region_id)
                    if self.opts.dest_region is not None:
                        dst_region = self.opts.dest_region
                    elif mode is MigrationMode.ZERO_COPY:
                        dst_region = src_region
                    else:
                        dst_region = BeamRegion.create(self.rec.memory, name)
                    argv = build_argv(spec, qmp_path=qmp, serial_path=serial,
                                      ram_fd=dst_region.fd, incoming=["defer"])
                    self.dst = await QemuProcess.launch(argv, qmp, qlog,
                                                        pass_fds=[dst_region.fd],
                                                        connect=False)
                self.host.adopt(self.dst)
                self.sampler.procs.append(self.dst)
                self.store.journal(self.mig_id, MigrationPhase.PREPARE,
                                   dst_pid=self.dst.pid, dst_start=self.dst.ref.start_time,
                                   dst_qmp=str(qmp), dst_serial=str(serial), dst_log=str(qlog),
                                   dst_instance=inst)
                crash_point(MigrationPhase.PREPARE)
                if mode is MigrationMode.CPR_TRANSFER:
                    await self._cpr_start(main_sock, cpr_sock)
                else:
                    await self.dst.connect()
                    if mode is MigrationMode.ZERO_COPY:
                        assert src_region is not None
                        await self._verify_shared(src_region)
                    await self._configure(main_sock)
                if self.opts.before_switch is not None:
                    await self.opts.before_switch(self.dst)
            except (VmbeamError, OSError) as exc:
                raise Rollback(f"preparing the destination failed: {exc}") from exc
            setup_ms = (time.monotonic() - t_prepare) * 1000
            self._phase_done(MigrationPhase.PREPARE)

            # ---- SWITCH: device state (plus RAM for precopy) crosses the socket ---------
            self.store.journal(self.mig_id, MigrationPhase.SWITCH)
            hb = read_status(Path(self.rec.serial_path)).heartbeat
            seq_before = hb.seq if hb else -1
            t0 = time.monotonic()
            if mode is not MigrationMode.CPR_TRANSFER:
                try:
                    self.switch_started = True
                    await self.src.execute("migrate", {"uri": f"unix:{main_sock}"})
                except QMPCommandError as exc:
                    raise Rollback(f"source refused to migrate: {exc}") from exc
            info = await self._wait_source()
            self._phase_done(MigrationPhase.SWITCH)
            crash_point(MigrationPhase.SWITCH)
            if self.opts.after_switch is not None:
                await self.opts.after_switch(self.dst)

            # ---- CONFIRM: the destination must run before the source may go -------------
            self.store.journal(self.mig_id, MigrationPhase.CONFIRM)
            await self._wait_dest_running()
            t1 = time.monotonic()
            cpu = cpu_seconds(self.src.pid) - cpu0 + cpu_seconds(self.dst.pid)
            self._phase_done(MigrationPhase.CONFIRM)

            # ---- RELOCATE: the guest is the destination's; the source quits -------------
            self.store.journal(self.mig_id, MigrationPhase.RELOCATE)
            old_src = self.src
            self.rec.pid, self.rec.pid_start = self.dst.pid, self.dst.ref.start_time
            self.rec.qmp_path, self.rec.serial_path = str(qmp), str(serial)
            self.rec.log_path, self.rec.instance = str(qlog), inst
            if dst_region is not None:
                self.rec.region_id = dst_region.region_id
            if spec.qemu != self.rec.qemu:
                self.rec.qemu = spec.qemu
            self.rec.state = GuestState.RUNNING
            self.store.update_guest(self.rec)
            crash_point(MigrationPhase.RELOCATE)
            guest_ok: bool | None = None
            if self.opts.verify_guest:
                hb2 = await wait_for_heartbeat(serial, after_seq=seq_before,
                                               timeout=self.opts.guest_timeout)
                guest_ok = hb2 is not None and hb2.ok
            frames = None
            if self.opts.compare_frames and mode is not MigrationMode.PRECOPY:
                frames = await asyncio.to_thread(self._compare, old_src.pid, self.dst.pid)
            self.sampler.sample()
            await self.sampler.stop()
            await old_src.quit()
            self.host.forget(old_src)
            self._phase_done(MigrationPhase.RELOCATE)

            result = MigrationResult(
                guest=name, mode=mode.value, status="completed",
                total_ms=round((t1 - t0) * 1000, 3),
                downtime_ms=info.get("downtime"),
                ram_transferred_bytes=int(info.get("ram", {}).get("transferred", 0)),
                shared_frames_ratio=frames.ratio if frames else None,
                guest_ok=guest_ok, qemu_total_ms=info.get("total-time"),
                setup_ms=round(setup_ms, 3), phases_ms=self.phases,
                frames=({"pages": frames.pages, "present_source": frames.present_a,
                         "present_dest": frames.present_b, "present_both": frames.both,
                         "same_frame": frames.same} if frames else None),
                peak_qemu_memory_bytes=self.sampler.peak, qemu_cpu_seconds=round(cpu, 3),
                source_pid=old_src.pid, dest_pid=self.dst.pid, migration_id=self.mig_id,
                memory_bytes=self.rec.memory)
            self.store.journal(self.mig_id, MigrationPhase.DONE, result=result.to_json())
            return result
        except Rollback as exc:
            try:
                await self._rollback(str(exc))
            except GuestLostError:
                raise
            except MigrationError as unsafe:
                self._needs_action(f"{exc}; rollback: {unsafe}")
                raise
            raise MigrationError(f"migration of {name!r} failed, source guest running: {exc}",
                                 source_resumed=True) from exc.__cause__
        except MigrationError as exc:
            self._needs_action(str(exc))
            raise
        finally:
            await self.sampler.stop()
            for region in {id(r): r for r in (src_region, dst_region) if r is not None}.values():
                if region is not self.opts.dest_region:
                    region.close()

    def _needs_action(self, why: str) -> None:
        self.rec.state = GuestState.NEEDS_ACTION
        self.store.update_guest(self.rec)
        self.store.journal(self.mig_id, MigrationPhase.FAILED, error=why)

    def _compare(self, pid_a: int, pid_b: int) -> FrameComparison | None:
        try:
            inode = (os.stat(f"/proc/{pid_b}/fd/{self._dst_fd}").st_ino
                     if self._dst_fd is not None else find_memfd_inode(pid_a, self.rec.memory))
            return compare_frames(pid_a, pid_b, inode, self.rec.memory)
        except (RegionError, OSError):
            return None

    async def _verify_shared(self, region: BeamRegion) -> None:
        """Refuse unless the destination maps this very region, shared (DESIGN §4.3, §4.4)."""
        assert self.dst is not None
        dst_fd = await ram_fd_of(self.dst)
        region.verify(read_identity_of(self.dst.pid, dst_fd))
        self._dst_fd = dst_fd
        for proc in (self.src, self.dst):
            share = await proc.execute("qom-get", {"path": f"/objects/{RAM_ID}",
                                                   "property": "share"})
            if share is not True:
                raise RegionError(f"QEMU {proc.pid} maps guest RAM without share=on")

    async def _configure(self, main_sock: Path) -> None:
        assert self.dst is not None
        # Set every capability explicitly: a QEMU that arrived by an earlier migration
        # keeps the capabilities it was given then.
        caps = [{"capability": "return-path", "state": True},
                {"capability": "x-ignore-shared",
                 "state": self.opts.mode is MigrationMode.ZERO_COPY}]
        for proc in (self.src, self.dst):
            await proc.execute("migrate-set-capabilities", {"capabilities": caps})
        if self.opts.mode is MigrationMode.PRECOPY:
            await self.src.execute("migrate-set-parameters",
                                   {"max-bandwidth": self.opts.max_bandwidth})
        await self.dst.execute("migrate-incoming", {"uri": f"unix:{main_sock}"})

    async def _cpr_start(self, main_sock: Path, cpr_sock: Path) -> None:
        """cpr-transfer: the new QEMU listens on the cpr socket; its QMP opens afterwards."""
        assert self.dst is not None
        deadline = time.monotonic() + 20
        while not cpr_sock.exists():
            if not self.dst.alive():
                raise LaunchError(f"new QEMU exited: {self.dst.log_tail()}")
            if time.monotonic() > deadline:
                raise LaunchError("new QEMU did not open its cpr socket")
            await asyncio.sleep(0.005)
        await self.src.execute("migrate-set-parameters", {"mode": "cpr-transfer"})
        self._cpr_channels = [
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix",
                                              "path": str(main_sock)}},
            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix",
                                             "path": str(cpr_sock)}}]
        self._cpr_main = main_sock

    async def _cpr_switch(self) -> None:
        assert self.dst is not None
        try:
            self.switch_started = True
            await self.src.execute("migrate", {"channels": self._cpr_channels})
            await self.dst.connect()
            await self.dst.execute("migrate-incoming", {"uri": f"unix:{self._cpr_main}"})
        except VmbeamError as exc:
            raise Rollback(f"cpr-transfer start failed: {exc}") from exc

    async def _wait_source(self) -> dict[str, Any]:
        """Poll the source until its migration completes; failures roll back."""
        if self.opts.mode is MigrationMode.CPR_TRANSFER:
            await self._cpr_switch()
        return await wait_for_handover(self.src.execute, self._timeout(), dst=self.dst)

    async def _wait_dest_running(self) -> None:
        """After the source completed: the destination must reach ``running``."""
        assert self.dst is not None
        deadline = time.monotonic() + 15
        while True:
            state = None
            if self.dst.alive():
                with contextlib.suppress(QMPCommandError):
                    state = await self.dst.run_state()
            if state == "running":
                return
            if not self.dst.alive() or time.monotonic() > deadline:
                # The source handed over; resuming it could run two diverging copies on one
                # memory. Keep it paused and tell the operator.
                raise MigrationError(
                    f"destination QEMU {'died' if not self.dst.alive() else 'did not start'} "
                    f"after the switch ({self.dst.log_tail(2)}); source kept paused — resolve "
                    f"with `vmbeam-kvm guest status {self.rec.name}`", source_resumed=False)
            await asyncio.sleep(0.002)

    async def _rollback(self, why: str) -> None:
        """Kill the destination, then make sure the source runs (never both)."""
        if self.dst is not None:
            self.dst.kill()
            self.host.forget(self.dst)
        if not self.src.alive():
            # The destination never ran (or was just killed before it could): no copy is left.
            self.rec.state = GuestState.LOST
            self.store.update_guest(self.rec)
            self.store.journal(self.mig_id, MigrationPhase.FAILED,
                               error=f"{why}; source QEMU gone: guest lost")
            raise GuestLostError(f"migration of {self.rec.name!r} failed and its source QEMU "
                                 f"(pid {self.src.pid}) is gone: the guest is lost ({why}; "
                                 f"{self.src.log_tail(2)})")
        await resume_source(self.src.execute, self.rec.name,
                            switch_started=self.switch_started)
        self.rec.state = GuestState.RUNNING
        self.store.update_guest(self.rec)
        self.store.journal(self.mig_id, MigrationPhase.FAILED, error=why)


# Journaled phases in which the source may have been asked to migrate.
SWITCH_STARTED = (MigrationPhase.SWITCH, MigrationPhase.CONFIRM, MigrationPhase.RELOCATE)

QMPExecute = Callable[[str, "dict[str, Any] | None"], Awaitable[Any]]


async def wait_for_handover(execute: QMPExecute, timeout: float, *,
                            dst: QemuProcess | None = None, poll: float = 0.001
                            ) -> dict[str, Any]:
    """Poll the source (through ``execute``) until its migration completes; return its
    final ``query-migrate``. Raises :class:`Rollback` when it fails, times out, or ``dst``
    (a destination QEMU of this host, when there is one) dies; the migration is cancelled
    first where the source would not stop by itself."""
    start = time.monotonic()
    dst_dead_at: float | None = None
    delay = poll
    while True:
        try:
            info: dict[str, Any] = await execute("query-migrate", None)
        except VmbeamError as exc:
            raise Rollback(f"lost the source's QMP during the switch: {exc}") from exc
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            why = info.get("error-desc", status)
            if dst is not None and await _dies_within(dst, 1.0):
                why = f"destination QEMU died ({dst.log_tail(2)}); {why}"
            raise Rollback(f"migration {status}: {why}")
        now = time.monotonic()
        if dst is not None and not dst.alive():
            dst_dead_at = dst_dead_at or now
            if now - dst_dead_at > 5:  # the source did not notice: stop it ourselves
                await _cancel(execute)
                raise Rollback("destination QEMU died during the switch")
        if now - start > timeout:
            await _cancel(execute)
            raise Rollback(f"timed out after {timeout:.0f} s (status {status})")
        await asyncio.sleep(delay)
        # Poll tightly while a zero-copy switch may finish (ms), back off for precopy.
        if now - start > 2:
            delay = min(delay * 2, max(poll, 0.05))


async def _cancel(execute: QMPExecute) -> None:
    with contextlib.suppress(VmbeamError):
        await execute("migrate_cancel", None)


async def _dies_within(proc: QemuProcess, seconds: float) -> bool:
    """Whether ``proc`` is, or within ``seconds`` is, gone: a killed QEMU's sockets close
    (and the source fails) a moment before the process is seen dead."""
    deadline = time.monotonic() + seconds
    while proc.alive():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True

_IN_FLIGHT = ("active", "setup", "device", "pre-switchover", "cancelling")


def handed_over(info: dict[str, Any]) -> bool:
    """Whether a source's ``query-migrate`` shows an *outgoing* migration that completed.

    A QEMU that itself arrived by migration reports that incoming migration as
    ``completed`` too, but without the source-side times (``total-time``), which QEMU fills
    in for every outgoing migration it ran (DESIGN §7.15).
    """
    return info.get("status") == "completed" and "total-time" in info


async def settle_incoming(src: QMPExecute, dst: QMPExecute, timeout: float = 10.0
                          ) -> str | None:
    """The run state a destination seen ``inmigrate`` settles in, for crash recovery.

    A source that handed over completes a moment before its destination has started the
    guest: give such a destination up to ``timeout`` to run rather than throw a complete
    move away. Returns ``inmigrate`` at once where the source did not hand over, None when
    the destination cannot be asked.
    """
    try:
        if not handed_over(await src("query-migrate", None)):
            return "inmigrate"
    except VmbeamError:
        return "inmigrate"
    deadline = time.monotonic() + timeout
    state: str | None = "inmigrate"
    while state == "inmigrate" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        try:
            state = str((await dst("query-status", None))["status"])
        except VmbeamError:
            return None
    return state


async def resume_source(execute: QMPExecute, name: str, *, switch_started: bool,
                        dest_never_ran: bool = False) -> None:
    """Ensure a source whose migration did not complete runs again.

    ``execute`` runs a QMP command on the source QEMU, directly (this host) or through a
    cloud VM's agent, so both topologies share one rule: a source that handed over is never
    resumed — unless its destination is known never to have executed (``dest_never_ran``:
    it was seen waiting for its incoming stream and has been killed). Only a run that asked
    the source to migrate (``switch_started``) can have handed over; before that, whatever
    ``query-migrate`` says is about an earlier migration.
    """
    if switch_started:
        info = await execute("query-migrate", None)
        if info.get("status") in _IN_FLIGHT:
            await execute("migrate_cancel", None)
            for _ in range(500):
                info = await execute("query-migrate", None)
                if info.get("status") not in _IN_FLIGHT:
                    break
                await asyncio.sleep(0.01)
        if handed_over(info) and not dest_never_ran:
            raise MigrationError(f"source of {name!r} already handed over; not resuming it",
                                 source_resumed=False)
    state = "?"
    for _ in range(500):
        state = (await execute("query-status", None))["status"]
        if state == "running":
            return
        if state in ("paused", "postmigrate", "finish-migrate"):
            with contextlib.suppress(VmbeamError):
                await execute("cont", None)
        await asyncio.sleep(0.01)
    raise MigrationError(f"source of {name!r} did not resume (state {state})",
                         source_resumed=False)


async def recover(host: Host, rec: GuestRecord, mig: MigrationRecord) -> None:
    """Resolve a migration whose command died: keep exactly one running copy.

    The caller holds the guest's lock.
    """
    store = host.store
    src_qmp, _, src_log = host.instance_paths(rec.name, mig.dst_instance - 1
                                              if mig.dst_instance else rec.instance)
    src = QemuProcess.attach(ProcessRef(mig.src_pid, mig.src_start), src_qmp, src_log)
    dst = None
    dst_state = None
    if mig.dst_pid:
        dst = QemuProcess.attach(ProcessRef(mig.dst_pid, mig.dst_start),
                                 Path(mig.dst_qmp), Path(mig.dst_log))
        if dst.alive():
            with contextlib.suppress(QMPCommandError):
                dst_state = await dst.run_state()
            if dst_state == "inmigrate" and src.alive():
                dst_state = await settle_incoming(src.execute, dst.execute)
    try:
        if dst is not None and dst_state == "running":
            if src.alive():
                await src.quit()
            rec = replace(rec, pid=mig.dst_pid, pid_start=mig.dst_start,
                          qmp_path=mig.dst_qmp, serial_path=mig.dst_serial,
                          log_path=mig.dst_log, instance=mig.dst_instance,
                          state=GuestState.RUNNING)
            if mig.mode == MigrationMode.PRECOPY.value:
                with contextlib.suppress(VmbeamError):
                    rec.region_id = read_identity_of(dst.pid, await ram_fd_of(dst)).region_id
            store.update_guest(rec)
            store.journal(mig.id, MigrationPhase.DONE,
                          error="recovered after a crash: destination kept")
            return
        never_ran = dst is not None and dst_state == "inmigrate"
        if dst is not None:
            dst.kill()
        if not src.alive():
            rec.state = GuestState.LOST
            store.update_guest(rec)
            store.journal(mig.id, MigrationPhase.FAILED,
                          error="recovered after a crash: both QEMUs gone")
            return
        # A source that handed over to a destination now gone is refused (needs action);
        # one whose destination never executed may run again.
        await resume_source(src.execute, rec.name, dest_never_ran=never_ran,
                            switch_started=mig.phase in SWITCH_STARTED)
        rec.state = GuestState.RUNNING
        store.update_guest(rec)
        store.journal(mig.id, MigrationPhase.FAILED,
                      error="recovered after a crash: source resumed")
    except MigrationError as exc:
        rec.state = GuestState.NEEDS_ACTION
        store.update_guest(rec)
        store.journal(mig.id, MigrationPhase.FAILED, error=f"recovery: {exc}")
    finally:
        await src.close()
        if dst is not None:
            await dst.close()


__all__ = ["MigrationMode", "MigrationOptions", "MigrationResult", "UnsafeStateError",
           "migrate_local", "recover", "resume_source", "wait_for_handover"]
