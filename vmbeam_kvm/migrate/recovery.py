"""Recovery of a move whose command died: one decision table, keyed on the journaled phase.

Opening a host resolves every move left unfinished. What each end reports is reduced to
two facts — does the source QEMU still run, and how does the destination look
(:class:`DestSeen`) — and :func:`decide` turns them, with the journaled phase, into one
:class:`Verdict`, the same for both placements. Each placement then carries it out through
its own eyes and hands (:class:`LocalEnds`: QEMU processes here; :class:`CloudEnds`: the
cloud VMs' agents and hot-plug).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ..agent.protocol import GONE, L2Status
from ..config import SETTLE_TIMEOUT, UNREACHABLE_PROBE_TIMEOUT
from ..errors import AgentError, BadInputError, MigrationError, VmbeamError
from ..heartbeat import Heartbeat, read_status, wait_for_heartbeat
from ..placement.cloud import CloudOps
from ..placement.local import LocalPlacement
from ..qemu.process import ProcessRef, QemuProcess
from ..region import read_identity_of
from ..store import GuestRecord, GuestState, MigrationPhase, MigrationRecord, Store
from ..ticks import CHARDEV_ID as TICKS_CHARDEV
from ..ticks import null_backend
from .handover import (
    SWITCH_STARTED,
    QMPExecute,
    end_outgoing,
    resume_source,
    settle_incoming,
)
from .model import MigrationMode
from .routes import ram_fd_of

log = logging.getLogger(__name__)


class DestSeen(StrEnum):
    """How the destination looks after the crash."""

    RUNNING = "running"      # it runs the guest: the switch happened
    INCOMING = "incoming"    # alive, still waiting for (or loading) its stream: never ran
    GONE = "gone"            # not there (never started, died, or fenced by us)
    UNKNOWN = "unknown"      # cannot be told (its cloud VM's agent does not answer)


class Verdict(StrEnum):
    KEEP_DEST = "destination kept"
    RESUME_SOURCE = "source resumed"
    WAIT_SOURCE = "source pending"  # never handed over, not answering: resumed once it does
    LOST = "both copies gone"
    NEEDS_ACTION = "needs action"


# Journaled phases in which the destination cannot have run: no switch was asked for, or
# the move rolled back with the destination seen never to have run (source-pending).
NO_SWITCH = (MigrationPhase.SHARE, MigrationPhase.PREPARE, MigrationPhase.SOURCE_PENDING)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    switch_started: bool = False   # the source may have been asked to migrate
    dest_never_ran: bool = False   # a handed-over source may still run (see resume_source)


def decide(phase: MigrationPhase, src_alive: bool | None, dest: DestSeen) -> Decision:
    """The decision table, for every placement.

    ============  =========  ==========  ==============================================
    destination   source     phase       verdict
    ============  =========  ==========  ==============================================
    running       any        any         keep the destination (the source quits)
    not running   unknown    share/prep/ wait for the source: the destination goes, the
                             src-pending guest is ``unreachable`` until its source answers
    unknown       any        any         needs action (cannot tell which copy runs)
    any other     unknown    switch..    needs action
    incoming      alive      any         resume the source (the destination never ran)
    gone          alive      share/prep  resume the source (no switch was asked for)
    gone          alive      src-pending resume the source (a ``migrate`` it was sent
                                         before it stopped answering finds no destination)
    gone          alive      switch..    resume unless the source handed over, else
                                         needs action (``resume_source`` decides)
    not running   gone       any         lost: no copy is left
    ============  =========  ==========  ==============================================
    """
    started = phase in SWITCH_STARTED
    pending = phase is MigrationPhase.SOURCE_PENDING
    if dest is DestSeen.RUNNING:
        return Decision(Verdict.KEEP_DEST)
    if src_alive is None and phase in NO_SWITCH:
        return Decision(Verdict.WAIT_SOURCE)
    if dest is DestSeen.UNKNOWN or src_alive is None:
        return Decision(Verdict.NEEDS_ACTION)
    if not src_alive:
        return Decision(Verdict.LOST)
    return Decision(Verdict.RESUME_SOURCE, switch_started=started or pending,
                    dest_never_ran=dest is DestSeen.INCOMING or pending)


class End(StrEnum):
    SOURCE = "source"
    DEST = "destination"


@dataclass(frozen=True)
class EndStatus:
    """One end's QEMU as seen now (for ``guest settle``)."""

    alive: bool
    run_state: str | None
    heartbeat: Heartbeat | None = None
    pid: int = 0


class Ends(ABC):
    """One placement's view of, and hands on, both ends of an interrupted move."""

    def __init__(self, store: Store, rec: GuestRecord, mig: MigrationRecord) -> None:
        self.store, self.rec, self.mig = store, rec, mig

    @abstractmethod
    async def observe(self) -> tuple[bool | None, DestSeen]:
        """Whether the source runs (None: unknown) and how the destination looks; a
        destination that cannot be asked but can be stopped for sure is stopped (GONE)."""

    @abstractmethod
    async def keep_dest(self) -> None:
        """The source quits and lets go; the record points at the destination."""

    @abstractmethod
    async def drop_dest(self) -> None:
        """The destination and its hold on memory go; the record points at the source."""

    @abstractmethod
    async def src_qmp(self, cmd: str, args: dict[str, object] | None = None) -> object: ...

    async def source_pid(self) -> int:
        return self.rec.pid

    def record(self, state: GuestState, phase: MigrationPhase, error: str) -> None:
        """The guest's new state, and the move's journal entry that explains it."""
        self.rec.state = state
        self.store.update_guest(self.rec)
        self.store.journal(self.mig.id, phase, error=error)

    @abstractmethod
    def where(self, end: End) -> str:
        """Where ``end`` runs, for the operator."""

    @abstractmethod
    async def status(self, end: End) -> EndStatus | None:
        """``end``'s QEMU as it is now; None when it cannot be asked."""

    @abstractmethod
    async def wait_heartbeat(self, end: End, after_seq: int, timeout: float
                             ) -> Heartbeat | None:
        """The first heartbeat of ``end``'s copy newer than ``after_seq``; None after
        ``timeout`` (or when it cannot be asked)."""

    async def close(self) -> None:
        """Let go of what observing took (QMP sessions)."""
        return None


async def recover(ends: Ends) -> Verdict:
    """Resolve one interrupted move: keep exactly one running copy, or flag the guest
    ``needs-action`` and touch nothing more. The caller holds the guest's lock."""
    store, rec, mig = ends.store, ends.rec, ends.mig
    try:
        try:
            src_alive, dest = await ends.observe()
            decision = decide(mig.phase, src_alive, dest)
            if decision.verdict is Verdict.NEEDS_ACTION:
                raise MigrationError("cannot tell which copy may run", source_resumed=False)
            if decision.verdict is Verdict.KEEP_DEST:
                await ends.keep_dest()
                ends.record(GuestState.RUNNING, MigrationPhase.DONE,
                            "recovered after a crash: destination kept")
                return decision.verdict
            await ends.drop_dest()
            if decision.verdict is Verdict.WAIT_SOURCE:
                ends.record(GuestState.UNREACHABLE, MigrationPhase.SOURCE_PENDING,
                            "source does not answer; it was never handed over")
                return decision.verdict
            if decision.verdict is Verdict.LOST:
                ends.record(GuestState.LOST, MigrationPhase.FAILED,
                            "recovered after a crash: both copies gone")
                return decision.verdict
            if mig.phase is MigrationPhase.SOURCE_PENDING:
                try:
                    # Continued, it may only now find its stream's peer gone: until that
                    # migration has ended it could not move, so it is not settled yet.
                    t0 = time.monotonic()
                    info = await end_outgoing(ends.src_qmp)
                    log.info("recovering %s: the source's outgoing migration is %s (%.1f s)",
                             rec.name, info.get("status"), time.monotonic() - t0)
                except MigrationError as exc:
                    ends.record(GuestState.UNREACHABLE, MigrationPhase.SOURCE_PENDING,
                                f"source answers; {exc}")
                    return Verdict.WAIT_SOURCE
            # A source that handed over to a destination now gone is refused (needs action).
            await resume_source(ends.src_qmp, rec.name,
                                switch_started=decision.switch_started,
                                dest_never_ran=decision.dest_never_ran)
            if mig.phase is MigrationPhase.SOURCE_PENDING:
                # Its ticks went to the meter of the move that failed: back to the sink.
                with contextlib.suppress(VmbeamError):
                    await ends.src_qmp("chardev-change", {"id": TICKS_CHARDEV,
                                                          "backend": null_backend()})
            rec.pid, rec.state = await ends.source_pid(), GuestState.RUNNING
            store.update_guest(rec)
            store.journal(mig.id, MigrationPhase.FAILED,
                          error="recovered after a crash: source resumed")
            return decision.verdict
        except VmbeamError as exc:
            rec.state = GuestState.NEEDS_ACTION
            store.update_guest(rec)
            store.journal(mig.id, MigrationPhase.FAILED,
                          error=f"interrupted move needs action: {exc}")
            return Verdict.NEEDS_ACTION
    finally:
        await ends.close()


class LocalEnds(Ends):
    """Both ends are QEMU processes on this host, found from the journal."""

    def __init__(self, place: LocalPlacement, rec: GuestRecord, mig: MigrationRecord) -> None:
        super().__init__(place.store, rec, mig)
        self.src_instance = mig.dst_instance - 1 if mig.dst_instance else rec.instance
        self.src_paths = place.instance_paths(rec.name, self.src_instance)
        src_qmp, _, src_log = self.src_paths
        # The host's own handles: QMP serves one client, and this command may hold one.
        procs = place.rt.procs
        self.src = procs.attach(ProcessRef(mig.src_pid, mig.src_start), src_qmp, src_log)
        self.dst = (procs.attach(ProcessRef(mig.dst_pid, mig.dst_start), Path(mig.dst_qmp),
                                 Path(mig.dst_log))
                    if mig.dst_pid else None)

    async def src_qmp(self, cmd: str, args: dict[str, object] | None = None) -> object:
        return await self.src.execute(cmd, args)

    async def observe(self) -> tuple[bool | None, DestSeen]:
        if self.dst is None or not self.dst.alive():
            return self.src.alive(), DestSeen.GONE
        state: str | None = None
        with contextlib.suppress(VmbeamError):
            state = await self.dst.run_state()
        if state == "inmigrate" and self.src.alive():
            state = await settle_incoming(self.src.execute, self.dst.execute, SETTLE_TIMEOUT)
        if state == "running":
            return self.src.alive(), DestSeen.RUNNING
        # A QEMU of ours we can always stop for sure: whatever it is, it goes.
        seen = DestSeen.INCOMING if state == "inmigrate" else DestSeen.GONE
        self.dst.kill()
        return self.src.alive(), seen

    async def keep_dest(self) -> None:
        mig = self.mig
        if self.src.alive():
            await self.src.quit()
        rec = self.rec
        rec.pid, rec.pid_start, rec.instance = mig.dst_pid, mig.dst_start, mig.dst_instance
        rec.qmp_path, rec.serial_path, rec.log_path = mig.dst_qmp, mig.dst_serial, mig.dst_log
        if mig.dst_disks:
            rec.disks = mig.dst_disks  # the files the destination opened (a copy's overlay)
        if mig.mode == MigrationMode.PRECOPY.value and self.dst is not None:
            with contextlib.suppress(VmbeamError):
                rec.region_id = read_identity_of(self.dst.pid, await ram_fd_of(self.dst)
                                                 ).region_id

    async def drop_dest(self) -> None:
        if self.dst is not None:
            self.dst.kill()
        rec, mig = self.rec, self.mig
        if rec.instance != self.src_instance and self.src.alive():
            # The record had moved on to the destination (guest settle keeps the source).
            with contextlib.suppress(VmbeamError):
                rec.region_id = read_identity_of(self.src.pid, await ram_fd_of(self.src)
                                                 ).region_id
        rec.pid, rec.pid_start, rec.instance = mig.src_pid, mig.src_start, self.src_instance
        rec.qmp_path, rec.serial_path, rec.log_path = (str(p) for p in self.src_paths)

    async def source_pid(self) -> int:
        return self.mig.src_pid

    def _proc(self, end: End) -> QemuProcess | None:
        return self.src if end is End.SOURCE else self.dst

    def _serial(self, end: End) -> Path:
        return self.src_paths[1] if end is End.SOURCE else Path(self.mig.dst_serial)

    def where(self, end: End) -> str:
        proc = self._proc(end)
        return f"QEMU pid {proc.pid}" if proc is not None else "no QEMU"

    async def status(self, end: End) -> EndStatus | None:
        proc = self._proc(end)
        if proc is None or not proc.alive():
            return EndStatus(alive=False, run_state=None)
        try:
            state = await proc.run_state()
        except VmbeamError:
            return None if proc.alive() else EndStatus(alive=False, run_state=None)
        return EndStatus(alive=True, run_state=state,
                         heartbeat=read_status(self._serial(end)).heartbeat, pid=proc.pid)

    async def wait_heartbeat(self, end: End, after_seq: int, timeout: float
                             ) -> Heartbeat | None:
        return await wait_for_heartbeat(self._serial(end), after_seq=after_seq,
                                        timeout=timeout)

    async def close(self) -> None:
        await self.src.close()
        if self.dst is not None:
            await self.dst.close()


class CloudEnds(Ends):
    """Both ends are L2 QEMUs in cloud VMs, seen through their agents."""

    def __init__(self, ops: CloudOps, rec: GuestRecord, mig: MigrationRecord) -> None:
        super().__init__(ops.store, rec, mig)
        self.ops = ops
        self.src: L2Status = GONE
        self.dst_pid = 0

    def _qmp(self, vm: str) -> QMPExecute:
        agent = self.ops.agent(self.ops.vm(vm))

        async def execute(cmd: str, args: dict[str, object] | None = None) -> object:
            return await agent.qmp(self.rec.name, cmd, args)
        return execute

    async def src_qmp(self, cmd: str, args: dict[str, object] | None = None) -> object:
        return await self._qmp(self.mig.src_cloud_vm)(cmd, args)

    async def observe(self) -> tuple[bool | None, DestSeen]:
        mig, name = self.mig, self.rec.name
        if not mig.src_cloud_vm:
            return None, DestSeen.UNKNOWN  # a journal from before cloud-VM recovery
        # The agents may be restarting: give them a moment, then decide. A source already
        # found not answering (source-pending) gets one short look: every command asks.
        pending = mig.phase is MigrationPhase.SOURCE_PENDING
        try:
            self.src = await self.ops.l2_status(
                mig.src_cloud_vm, name, wait=0 if pending else 30,
                timeout=UNREACHABLE_PROBE_TIMEOUT if pending else None)
        except AgentError as exc:
            log.warning("recovering %s: the source does not answer: %s", name, exc)
            return None, await self._dest_seen()
        try:
            dst = (await self.ops.l2_status(mig.dst_cloud_vm, name, wait=30)
                   if mig.dst_cloud_vm else GONE)
        except AgentError as exc:
            log.warning("recovering %s: the destination does not answer: %s", name, exc)
            return self.src.alive, DestSeen.UNKNOWN
        state = dst.run_state if dst.alive else None
        if state == "inmigrate" and self.src.alive:
            state = await settle_incoming(self._qmp(mig.src_cloud_vm),
                                          self._qmp(mig.dst_cloud_vm), SETTLE_TIMEOUT)
            if state is None:
                return self.src.alive, DestSeen.UNKNOWN
        if not dst.alive:
            seen = DestSeen.GONE
        elif state == "running":
            self.dst_pid = dst.pid
            seen = DestSeen.RUNNING
        elif state == "inmigrate":
            seen = DestSeen.INCOMING
        else:
            seen = DestSeen.GONE  # alive but neither: drop_dest stops it
        return self.src.alive, seen

    async def _dest_seen(self) -> DestSeen:
        """The destination alone, for a source that does not answer (nothing can settle
        an ``inmigrate`` destination then: it is incoming)."""
        if not self.mig.dst_cloud_vm:
            return DestSeen.GONE
        try:
            dst = await self.ops.l2_status(self.mig.dst_cloud_vm, self.rec.name, wait=30)
        except AgentError:
            return DestSeen.UNKNOWN
        if not dst.alive:
            return DestSeen.GONE
        return {"running": DestSeen.RUNNING, "inmigrate": DestSeen.INCOMING}.get(
            dst.run_state or "", DestSeen.GONE)

    async def keep_dest(self) -> None:
        mig, name = self.mig, self.rec.name
        src_vm = self.ops.vm(mig.src_cloud_vm)
        if self.src.alive:
            await self.ops.agent(src_vm).stop_guest(name, kill=True)
        await self.ops.release(src_vm, mig.src_region)
        await self.ops.release_disks(src_vm, name)  # its beam disks: the destination's now
        if mig.src_region and mig.src_region != mig.dst_region:
            self.store.remove_region(mig.src_region)
        self.rec.cloud_vm, self.rec.pid = mig.dst_cloud_vm, self.dst_pid
        self.rec.region_id = mig.dst_region

    async def drop_dest(self) -> None:
        mig, name = self.mig, self.rec.name
        dst_vm = None
        if mig.dst_cloud_vm:
            with contextlib.suppress(BadInputError):  # its record is gone: nothing to undo
                dst_vm = self.ops.vm(mig.dst_cloud_vm)
        if dst_vm is not None:
            if self.ops.l1(dst_vm).alive():
                await self.ops.agent(dst_vm).stop_guest(name, kill=True)
            if mig.dst_region:
                await self.ops.release(dst_vm, mig.dst_region)
            await self.ops.release_disks(dst_vm, name)
        if mig.dst_region and mig.dst_region != mig.src_region:
            self.store.remove_region(mig.dst_region)
        self.rec.cloud_vm, self.rec.region_id = mig.src_cloud_vm, mig.src_region

    async def source_pid(self) -> int:
        return self.src.pid

    def _vm(self, end: End) -> str:
        return self.mig.src_cloud_vm if end is End.SOURCE else self.mig.dst_cloud_vm

    def where(self, end: End) -> str:
        vm = self._vm(end)
        return f"in cloud VM {vm}" if vm else "nowhere"

    async def status(self, end: End) -> EndStatus | None:
        vm = self._vm(end)
        if not vm:
            return EndStatus(alive=False, run_state=None)
        try:
            st = await self.ops.l2_status(vm, self.rec.name, wait=10)
        except AgentError:
            return None
        # What keep_dest / drop_dest act on.
        if end is End.SOURCE:
            self.src = st
        elif st.alive:
            self.dst_pid = st.pid
        return EndStatus(alive=st.alive, run_state=st.run_state if st.alive else None,
                         heartbeat=st.heartbeat, pid=st.pid)

    async def wait_heartbeat(self, end: End, after_seq: int, timeout: float
                             ) -> Heartbeat | None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                hb = (await self.ops.l2_status(self._vm(end), self.rec.name)).heartbeat
            except AgentError:
                return None
            if hb is not None and hb.seq > after_seq:
                return hb
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.3)


async def recover_move(local: LocalPlacement, cloud: CloudOps, rec: GuestRecord,
                       mig: MigrationRecord) -> Verdict:
    """Resolve move ``mig`` of guest ``rec`` through the placement it ran on."""
    ends: Ends = (CloudEnds(cloud, rec, mig) if rec.cloud_vm or mig.src_cloud_vm
                  else LocalEnds(local, rec, mig))
    verdict = await recover(ends)
    log.info("recovered migration %d of %s: %s", mig.id, rec.name, verdict.value)
    return verdict
