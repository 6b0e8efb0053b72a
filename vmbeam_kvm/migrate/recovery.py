"""Recovery of a move whose command died: one decision table, keyed on the journaled phase.

Opening a host resolves every move left unfinished. What each end reports is reduced to
two facts — does the source QEMU still run, and how does the destination look
(:class:`DestSeen`) — and :func:`decide` turns them, with the journaled phase, into one
:class:`Verdict`, the same for both placements. Each placement then carries it out through
its own eyes and hands (:class:`LocalEnds`: QEMU processes here; :class:`CloudEnds`: the
cloud VMs' agents and hot-plug).
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ..agent.protocol import GONE, L2Status
from ..config import SETTLE_TIMEOUT
from ..errors import AgentError, BadInputError, MigrationError, VmbeamError
from ..placement.cloud import CloudOps
from ..placement.local import LocalPlacement
from ..qemu.process import ProcessRef, QemuProcess
from ..region import read_identity_of
from ..store import GuestRecord, GuestState, MigrationPhase, MigrationRecord, Store
from .handover import SWITCH_STARTED, QMPExecute, resume_source, settle_incoming
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
    LOST = "both copies gone"
    NEEDS_ACTION = "needs action"


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
    unknown       any        any         needs action (cannot tell which copy runs)
    any other     unknown    any         needs action
    incoming      alive      any         resume the source (the destination never ran)
    gone          alive      share/prep  resume the source (no switch was asked for)
    gone          alive      switch..    resume unless the source handed over, else
                                         needs action (``resume_source`` decides)
    not running   gone       any         lost: no copy is left
    ============  =========  ==========  ==============================================
    """
    started = phase in SWITCH_STARTED
    if dest is DestSeen.RUNNING:
        return Decision(Verdict.KEEP_DEST)
    if dest is DestSeen.UNKNOWN or src_alive is None:
        return Decision(Verdict.NEEDS_ACTION)
    if not src_alive:
        return Decision(Verdict.LOST)
    return Decision(Verdict.RESUME_SOURCE, switch_started=started,
                    dest_never_ran=dest is DestSeen.INCOMING)


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
                rec.state = GuestState.RUNNING
                store.update_guest(rec)
                store.journal(mig.id, MigrationPhase.DONE,
                              error="recovered after a crash: destination kept")
                return decision.verdict
            await ends.drop_dest()
            if decision.verdict is Verdict.LOST:
                rec.state = GuestState.LOST
                store.update_guest(rec)
                store.journal(mig.id, MigrationPhase.FAILED,
                              error="recovered after a crash: both copies gone")
                return decision.verdict
            # A source that handed over to a destination now gone is refused (needs action).
            await resume_source(ends.src_qmp, rec.name,
                                switch_started=decision.switch_started,
                                dest_never_ran=decision.dest_never_ran)
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
        src_qmp, _, src_log = place.instance_paths(rec.name, mig.dst_instance - 1
                                                   if mig.dst_instance else rec.instance)
        self.src = QemuProcess.attach(ProcessRef(mig.src_pid, mig.src_start), src_qmp, src_log)
        self.dst = (QemuProcess.attach(ProcessRef(mig.dst_pid, mig.dst_start),
                                       Path(mig.dst_qmp), Path(mig.dst_log))
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

    async def source_pid(self) -> int:
        return self.mig.src_pid

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
        try:  # the agents may be restarting: give them a moment, then decide
            self.src = await self.ops.l2_status(mig.src_cloud_vm, name, wait=30)
            dst = (await self.ops.l2_status(mig.dst_cloud_vm, name, wait=30)
                   if mig.dst_cloud_vm else GONE)
        except AgentError as exc:
            log.warning("recovering %s: cannot see both sides: %s", name, exc)
            return None, DestSeen.UNKNOWN
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

    async def keep_dest(self) -> None:
        mig, name = self.mig, self.rec.name
        src_vm = self.ops.vm(mig.src_cloud_vm)
        if self.src.alive:
            await self.ops.agent(src_vm).stop_guest(name, kill=True)
        await self.ops.release(src_vm, mig.src_region)
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
        if mig.dst_region and mig.dst_region != mig.src_region:
            self.store.remove_region(mig.dst_region)
        self.rec.cloud_vm, self.rec.region_id = mig.src_cloud_vm, mig.src_region

    async def source_pid(self) -> int:
        return self.src.pid


async def recover_move(local: LocalPlacement, cloud: CloudOps, rec: GuestRecord,
                       mig: MigrationRecord) -> Verdict:
    """Resolve move ``mig`` of guest ``rec`` through the placement it ran on."""
    ends: Ends = (CloudEnds(cloud, rec, mig) if rec.cloud_vm or mig.src_cloud_vm
                  else LocalEnds(local, rec, mig))
    verdict = await recover(ends)
    log.info("recovered migration %d of %s: %s", mig.id, rec.name, verdict.value)
    return verdict
