"""One move of a guest: the phase machine every placement runs.

A move goes share → prepare → switch → confirm → relocate, each phase journaled before it
starts (the store's :class:`~vmbeam_kvm.store.MigrationPhase`), so that a command that
dies mid-move is resolved from the journal (:mod:`.recovery`). What differs between moving
a guest on this host and moving it between cloud VMs — how memory is shared and let go,
where the destination QEMU starts, how each QEMU is reached — is a :class:`Route` (the
per-transport spec of libvirt's ``qemu_migration.c``); :mod:`.routes` has both, phase by
phase. Everything else lives here once: timing, capabilities and parameters per party,
the switch and the wait for the handover, the confirmation that the destination runs,
rollback, the needs-action policy, progress events and the result.

Safety rules (docs/design.md §4.4, §4.6, §7.15): the destination maps the very region (checked
before any switch); ``return-path`` makes the source wait for the destination to load; the
destination is confirmed ``running`` before the source quits; a source that handed over is
never resumed. Any failure before the switch leaves the source running (or, where the
source's end stops answering, the guest ``unreachable`` until it answers: nothing was handed
over); a failure after it leaves the source paused and the guest ``needs-action``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..config import CONFIRM_TIMEOUT, HANDOVER_TIMEOUT, PRECOPY_TIMEOUT
from ..errors import GuestLostError, MigrationError, Rollback, VmbeamError
from ..heartbeat import Heartbeat
from ..qemu.features import SHARED_RAM_CHECK, guarantees
from ..qemu.machine import GuestImage
from ..store import GuestRecord, GuestState, MigrationPhase, Store
from ..ticks import CHARDEV_ID as TICKS_CHARDEV
from ..ticks import TickMeter, null_backend, tcp_backend
from . import faults
from .handover import DestWatch, QMPExecute, resume_source, wait_for_handover
from .model import MigrationMode, MigrationOptions, MigrationResult, ProgressEvent


@dataclass
class Party:
    """Migration capabilities and parameters of one end (set on it every time: a QEMU
    that arrived by migration keeps what its last migration was given)."""

    caps: dict[str, bool] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    async def apply(self, qmp: QMPExecute) -> None:
        if self.caps:
            await qmp("migrate-set-capabilities", {"capabilities": [
                {"capability": c, "state": on} for c, on in self.caps.items()]})
        if self.params:
            await qmp("migrate-set-parameters", self.params)


class Route(ABC):
    """The topology-specific steps of one move of guest ``rec`` (see module docstring).

    ``where`` keys the tunables (``local`` / ``cloud-vm``); ``poll`` is how often the
    engine may ask a QEMU of this route (a round trip through an agent costs more).
    """

    where: str
    poll: float
    guest_timeout: float
    probes_parties = True  # both QEMUs answer QMP before the switch (not cpr-transfer)

    def __init__(self, rec: GuestRecord, opts: MigrationOptions) -> None:
        self.rec, self.opts, self.mode = rec, opts, opts.mode
        self.src_pid = rec.pid  # the source QEMU's pid (as its placement numbers it)
        self.switched_at = 0.0  # when the source handed over (monotonic)
        self.switch_started = False

    def note(self, **values: Any) -> None:
        """Journal ``values`` with the current phase (set by the engine)."""
        raise NotImplementedError  # set by the engine the moment it asks for the switch

    # -- reaching the two QEMUs -------------------------------------------------------------
    @abstractmethod
    async def src_qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...

    @abstractmethod
    async def dst_qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...

    def dest_watch(self) -> DestWatch | None:
        """A destination process the handover wait can watch directly, if any."""
        return None

    # Resources that copy (:mod:`.resources`) need the source stopped at pre-switchover.
    pauses_at_switchover = False

    async def at_switchover(self) -> None:
        """The source stopped at pre-switchover: finish what must be final before device
        state is (a disk copy), then let it continue."""
        return None

    # -- the guest's ticks (vmbeam_kvm.ticks) -------------------------------------------------
    ticks_to: tuple[str, int] | None = None  # where the destination sends them (its argv)
    src_ticks = True  # the source QEMU has a tick port (so the destination gets one too)

    def meter_address(self) -> tuple[str, str | None] | None:
        """Where a tick meter for this route binds: (address, namespace); None: nowhere."""
        return None

    async def probe_ticks(self) -> None:
        """Learn whether the source QEMU has a tick port (an earlier release's had none)."""
        chardevs = await self.src_qmp("query-chardev")
        self.src_ticks = any(c.get("label") == TICKS_CHARDEV for c in chardevs)

    async def point_ticks(self, qmp: QMPExecute, backend: dict[str, Any]) -> None:
        await qmp("chardev-change", {"id": TICKS_CHARDEV, "backend": backend})

    @property
    @abstractmethod
    def hook_target(self) -> Any:
        """What fault hooks are given (the destination QemuProcess or AgentClient)."""

    # -- the phases ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Before the journal: take what the whole move needs (e.g. agent channels)."""
        return None

    @abstractmethod
    async def share(self) -> None:
        """Make the guest's memory (or, for precopy, fresh memory) the destination's to
        map, journaling (:meth:`note`) what recovery must take back before it is taken.
        Raises VmbeamError (the move rolls back)."""

    @abstractmethod
    async def launch(self) -> None:
        """Start the destination QEMU waiting for an incoming stream, journaling where it
        runs as soon as it exists (so that recovery can find it)."""

    async def verify(self) -> None:
        """Refuse unless the destination maps the very memory of the guest (zero-copy)."""
        return None

    async def tune(self, src: Party, dst: Party) -> None:
        """Add this route's capabilities and parameters to each party (TLS, throttling)."""
        return None

    async def configure(self, src: Party, dst: Party) -> None:
        await src.apply(self.src_qmp)
        await dst.apply(self.dst_qmp)

    @abstractmethod
    async def listen(self) -> str:
        """Make the destination listen; returns the URI the source migrates to."""

    async def last_look(self) -> None:
        """Last check before the point of no return (the destination is still there)."""
        return None

    async def switch(self, uri: str) -> None:
        await self.src_qmp("migrate", {"uri": uri})

    @abstractmethod
    async def dest_state(self) -> tuple[bool, str | None]:
        """Whether the destination QEMU is alive, and its run state (None: not known)."""

    @abstractmethod
    def dest_failed(self, alive: bool) -> str:
        """Why the destination did not confirm, for the operator."""

    def measure_start(self) -> None:
        """Start the route's cost figures (CPU, network, memory)."""
        return None

    def measure_confirmed(self) -> None:
        """The destination runs: stop the cost figures that end with the switch."""
        return None

    @abstractmethod
    def commit(self) -> None:
        """Point the guest's record at the destination (it runs the guest now)."""

    @abstractmethod
    async def relocate(self) -> None:
        """The source QEMU quits and its hold on the guest's memory goes."""

    @abstractmethod
    async def heartbeat(self) -> Heartbeat | None: ...

    @abstractmethod
    async def wait_heartbeat(self, after_seq: int, timeout: float) -> Heartbeat | None: ...

    @abstractmethod
    async def drop_dest(self) -> None:
        """Rollback: the destination QEMU and its memory hold go (never runs twice)."""

    @abstractmethod
    async def source_alive(self) -> tuple[bool | None, str]:
        """Whether the source QEMU still runs the guest (None: its end does not answer);
        if not, where it went."""

    # The source's end stopped answering during this move (its cloud VM is stopped or
    # hung): the engine asks it nothing more.
    source_unanswered = False

    def pending_text(self) -> str:
        """Where the unanswering source is, for the operator."""
        return "its source does not answer"

    def fill(self, result: MigrationResult) -> None:
        """This route's figures of the result."""
        return None

    async def settle(self) -> None:
        """After the move: finish what relocation left pending, if it finishes soon."""
        return None

    async def cleanup(self) -> None:
        """Whatever the move held in this process, success or failure."""
        return None

    def resumed_text(self) -> str:
        return "source guest running"


class MigrationRun:
    """One execution of the phase machine for one guest along one route."""

    def __init__(self, store: Store, route: Route, mig_id: int,
                 requested: float | None = None) -> None:
        self.store, self.route, self.mig_id = store, route, mig_id
        self.rec, self.opts, self.mode = route.rec, route.opts, route.mode
        self.phases: dict[str, float] = {}
        self._t_start = self._mark = time.monotonic()
        self._requested = self._t_start if requested is None else requested
        self._last_ram = 0.0
        self._phase = MigrationPhase.SHARE
        self.shared_ram_checked: bool | None = None
        self.missing: list[str] = []
        self.meter: TickMeter | None = None
        self._committed = False  # the record points at the destination
        self._baseline: float | None = None  # work steps/s before the move
        self._measuring = 0.0  # seconds spent only to measure (not in command_ms)
        route.note = self._note  # type: ignore[method-assign]

    def _note(self, **values: Any) -> None:
        self.store.journal(self.mig_id, self._phase, **values)

    # -- journal, timing, progress ----------------------------------------------------------
    def _enter(self, phase: MigrationPhase, **values: Any) -> None:
        """Journal ``phase`` (before it starts) and tell the progress listener."""
        now = time.monotonic()
        last: float | None = None
        if self.phases or phase is not MigrationPhase.SHARE:
            prev = list(MigrationPhase)[list(MigrationPhase).index(phase) - 1]
            last = self.phases[prev.value] = round((now - self._mark) * 1000, 3)
        self._mark = now
        self._phase = phase
        self.store.journal(self.mig_id, phase, **values)
        self._emit(ProgressEvent(self.rec.name, "phase", phase.value, self._elapsed(now),
                                 last_phase_ms=last))

    def _elapsed(self, now: float) -> float:
        return round((now - self._t_start) * 1000, 3)

    def _emit(self, ev: ProgressEvent) -> None:
        if self.opts.progress is not None:
            self.opts.progress(ev)

    def _on_info(self, info: dict[str, Any]) -> None:
        now = time.monotonic()
        ram = info.get("ram")
        if not ram or now - self._last_ram < 0.25:
            return
        self._last_ram = now
        self._emit(ProgressEvent(
            self.rec.name, "ram", MigrationPhase.SWITCH.value, self._elapsed(now),
            ram_total=int(ram.get("total", 0)), ram_transferred=int(ram.get("transferred", 0)),
            ram_remaining=int(ram.get("remaining", 0)),
            dirty_rate=int(ram.get("dirty-pages-rate", 0)),
            expected_downtime_ms=info.get("expected-downtime")))

    async def _shared_ram_check(self, src: Party, dst: Party, zero_copy: bool) -> None:
        """Zero-copy: have the QEMUs themselves prove that the destination maps the source's
        shared RAM (patched QEMU, ``x-ignore-shared-check``), where both ends can; the
        capability is set (or cleared) on every end that has it, every time."""
        self.shared_ram_checked = None
        if not self.route.probes_parties:
            return
        ends = [await guarantees(self.route.src_qmp), await guarantees(self.route.dst_qmp)]
        both = all(g.shared_ram_check for g in ends)
        for party, g in zip((src, dst), ends, strict=True):
            if g.shared_ram_check:
                party.caps[SHARED_RAM_CHECK] = zero_copy and both
        if zero_copy:
            self.shared_ram_checked = both
            self.missing = sorted({m for g in ends for m in g.missing()
                                   if SHARED_RAM_CHECK in m} | set(self.missing))

    def _handover_timeout(self) -> float:
        if self.opts.timeout is not None:
            return self.opts.timeout
        if self.mode is MigrationMode.PRECOPY:
            base, per_gib = PRECOPY_TIMEOUT[self.route.where]
            return base + per_gib * self.rec.memory / (1 << 30)
        return HANDOVER_TIMEOUT[self.route.where]

    # -- the move -------------------------------------------------------------------------
    async def execute(self) -> MigrationResult:
        route, name, hooks = self.route, self.rec.name, faults.hooks()
        route.measure_start()
        try:
            # ---- SHARE + PREPARE: the destination QEMU on shared (or fresh) memory --------
            try:
                self._enter(MigrationPhase.SHARE)
                await route.probe_ticks()
                await self._start_meter()
                if hooks.at_share is not None:
                    await hooks.at_share(route.hook_target)
                await route.share()
                faults.crash_point(MigrationPhase.SHARE)
                self._enter(MigrationPhase.PREPARE)
                await route.launch()
                faults.crash_point(MigrationPhase.PREPARE)
                await route.verify()
                zero_copy = self.mode is MigrationMode.ZERO_COPY
                common = {"return-path": True, "x-ignore-shared": zero_copy}
                src = Party(dict(common), {"max-bandwidth": self.opts.max_bandwidth})
                dst = Party(dict(common))
                await self._shared_ram_check(src, dst, zero_copy)
                await route.tune(src, dst)
                await route.configure(src, dst)
                uri = await route.listen()
                if hooks.before_switch is not None:
                    await hooks.before_switch(route.hook_target)
                await route.last_look()
            except VmbeamError as exc:
                raise Rollback(f"preparing the destination failed: {exc}") from exc
            setup_ms = (time.monotonic() - self._t_start) * 1000

            # ---- SWITCH: device state (plus RAM for precopy) crosses to the destination ---
            self._enter(MigrationPhase.SWITCH)
            if self.meter is not None:
                # The destination connects to the meter in the background: let it, so
                # that its first ticks are not missed (a meter it cannot reach only
                # leaves the figures None).
                await self.meter.wait_connections(2, 2.0)
            try:
                hb0 = await route.heartbeat()
            except VmbeamError as exc:  # the source was not asked to migrate yet
                raise Rollback(f"the source did not answer before the switch: {exc}") from exc
            t0, wall0 = time.monotonic(), time.time()
            try:
                route.switch_started = True
                await route.switch(uri)
            except VmbeamError as exc:
                raise Rollback(f"the source did not start the switch: {exc}") from exc
            info = await wait_for_handover(route.src_qmp, self._handover_timeout(),
                                           dst=route.dest_watch(), poll=route.poll,
                                           on_info=self._on_info,
                                           on_switchover=(route.at_switchover
                                                          if route.pauses_at_switchover
                                                          else None))
            route.switched_at = time.monotonic()
            faults.crash_point(MigrationPhase.SWITCH)
            if hooks.after_switch is not None:
                await hooks.after_switch(route.hook_target)

            # ---- CONFIRM: the destination must run before the source may go -------------
            self._enter(MigrationPhase.CONFIRM)
            await self._confirm()
            t1, wall1 = time.monotonic(), time.time()
            route.measure_confirmed()

            # ---- RELOCATE: the guest is the destination's; the source lets go -----------
            self._enter(MigrationPhase.RELOCATE)
            route.commit()
            self._committed = True
            self.rec.state = GuestState.RUNNING
            self.store.update_guest(self.rec)
            faults.crash_point(MigrationPhase.RELOCATE)
            await route.relocate()
            self.phases[MigrationPhase.RELOCATE.value] = round(
                (time.monotonic() - self._mark) * 1000, 3)
            guest_ok: bool | None = None
            # A guest booted from its own disk may send no heartbeat: not checked (None).
            if self.opts.verify_guest and (hb0 is not None
                                           or GuestImage(self.rec.image).heartbeats):
                hb1 = await route.wait_heartbeat(hb0.seq if hb0 else -1, route.guest_timeout)
                guest_ok = hb1 is not None and hb1.ok
            await route.settle()

            result = MigrationResult(
                guest=name, mode=self.mode.value, status="completed",
                total_ms=round((t1 - t0) * 1000, 3), downtime_ms=info.get("downtime"),
                ram_transferred_bytes=int(info.get("ram", {}).get("transferred", 0)),
                shared_frames_ratio=None, guest_ok=guest_ok,
                qemu_total_ms=info.get("total-time"), setup_ms=round(setup_ms, 3),
                phases_ms=self.phases, source_pid=route.src_pid, dest_pid=self.rec.pid,
                migration_id=self.mig_id, memory_bytes=self.rec.memory)
            result.shared_ram_checked = self.shared_ram_checked
            result.command_ms = round(
                (time.monotonic() - self._requested - self._measuring) * 1000, 3)
            result.guarantees_missing = self.missing
            route.fill(result)
            await self._measure_tail(result, wall0, wall1)
            self.store.journal(self.mig_id, MigrationPhase.DONE, result=result.to_json())
            self._emit(ProgressEvent(name, "phase", MigrationPhase.DONE.value,
                                     self._elapsed(time.monotonic()),
                                     last_phase_ms=self.phases[MigrationPhase.RELOCATE.value]))
            return result
        except Rollback as exc:
            try:
                resumed = await self._rollback(str(exc))
            except GuestLostError:
                raise
            except VmbeamError as unsafe:
                self._needs_action(f"{exc}; rollback: {unsafe}")
                if isinstance(unsafe, MigrationError):
                    raise
                raise MigrationError(f"migration of {name!r} failed ({exc}) and its source "
                                     f"could not be resumed: {unsafe}",
                                     source_resumed=False) from unsafe
            if not resumed:
                raise MigrationError(
                    f"migration of {name!r} failed before its source handed over, and "
                    f"{route.pending_text()}: the guest is recorded unreachable and runs "
                    f"again (state running) as soon as it answers; any command sees to "
                    f"that ({exc})", source_resumed=False, source_pending=True
                ) from exc.__cause__
            raise MigrationError(f"migration of {name!r} failed, {route.resumed_text()}: "
                                 f"{exc}", source_resumed=True) from exc.__cause__
        except VmbeamError as exc:
            # After the switch started: the source may have handed over; never guess.
            self._needs_action(str(exc))
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(f"migration of {name!r} failed after the switch: {exc}",
                                 source_resumed=False) from exc
        finally:
            await self._stop_meter()
            await route.cleanup()

    # -- the guest's ticks ------------------------------------------------------------------
    async def _start_meter(self) -> None:
        """Point the source's tick port at a new meter (the destination is launched with
        it), unless the move is not measured or the guest has no tick port."""
        self.meter = None
        where = self.route.meter_address()
        if not self.opts.measure_pause or not self.route.src_ticks or where is None:
            return
        # A move is never failed by its measurement: without a meter, the figures stay None.
        try:
            meter = TickMeter(*where)
        except OSError:
            return
        try:
            await self.route.point_ticks(self.route.src_qmp, tcp_backend(*meter.endpoint))
        except VmbeamError:
            meter.close()
            return
        except BaseException:
            meter.close()
            raise
        self.meter, self.route.ticks_to = meter, meter.endpoint
        if self.opts.tail_window > 0:
            # The work rate before the move, while nothing else competes with the guest
            # (during share and prepare the destination's start does).
            t = time.time()
            await asyncio.sleep(self.opts.tail_window + 0.05)
            self._baseline = meter.rate(t, time.time())
            self._measuring = time.time() - t

    async def _measure_tail(self, result: MigrationResult, wall0: float,
                            wall1: float) -> None:
        """The pause the guest saw around the switch (it stopped after ``wall0`` and ran
        again by ``wall1``) and its work rate on each side; left None without ticks."""
        meter, window = self.meter, self.opts.tail_window
        if meter is None:
            return
        first = meter.first_arrival()
        if first is None or first > wall0:
            return  # a guest that sends no ticks (the Linux image): nothing to wait for
        if not await meter.wait_after(wall1, 5.0):
            return
        gap = meter.longest_gap(wall0, wall1)
        if gap is not None and window > 0:
            await meter.wait_after(gap[1] + window, window + 5.0)
        figures = meter.figures(wall0, wall1, max(window, 0.2))
        if figures is None:
            return
        result.pause_ms = figures.pause_ms
        if window > 0 and self._baseline and figures.rate_after is not None:
            result.post_switch_slowdown = round(figures.rate_after / self._baseline, 3)

    async def _stop_meter(self) -> None:
        """Ticks back to the null sink on whichever QEMU runs the guest now."""
        meter, self.meter = self.meter, None
        if meter is None:
            return
        if not self._committed and self.route.source_unanswered:
            meter.close()  # asking again would only wait as long once more
            return
        qmp = self.route.dst_qmp if self._committed else self.route.src_qmp
        with contextlib.suppress(VmbeamError):
            await self.route.point_ticks(qmp, null_backend())
        meter.close()

    async def _confirm(self) -> None:
        """After the source completed: the destination must reach ``running``."""
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while True:
            alive, state = await self.route.dest_state()
            if state == "running":
                return
            if not alive or time.monotonic() > deadline:
                # The source handed over; resuming it could run two diverging copies of
                # one memory. Keep it paused and tell the operator.
                raise MigrationError(f"{self.route.dest_failed(alive)}; source kept paused — "
                                     f"resolve with `vmbeam-kvm guest status "
                                     f"{self.rec.name}`", source_resumed=False)
            await asyncio.sleep(self.route.poll * 2)

    async def _rollback(self, why: str) -> bool:
        """The source is looked at, the destination goes, and only then does the source
        run again (never both). Returns
        False where the source does not answer (its cloud VM is stopped or hung) but was
        never handed over: the destination, seen never to have run, is gone, and the
        guest is recorded ``unreachable`` (journal ``source-pending``) for the next command
        to resume once it answers. Raises MigrationError (needs action) where it does not
        answer after the switch started and the destination may have run."""
        route = self.route
        alive, where = await route.source_alive()  # looked at first: None = no answer
        if alive is None and route.switch_started and not await self._dest_never_ran():
            raise MigrationError(f"the source does not answer ({where}) and the "
                                 f"destination may have run", source_resumed=False)
        await route.drop_dest()
        if alive is None:
            self.rec.state = GuestState.UNREACHABLE
            self.store.update_guest(self.rec)
            self.store.journal(self.mig_id, MigrationPhase.SOURCE_PENDING,
                               error=f"{why}; source does not answer ({where})")
            return False
        if not alive:
            # The destination never ran and is gone too: no copy is left anywhere.
            self.rec.state = GuestState.LOST
            self.store.update_guest(self.rec)
            self.store.journal(self.mig_id, MigrationPhase.FAILED,
                               error=f"{why}; source gone: guest lost")
            raise GuestLostError(f"migration of {self.rec.name!r} failed and its source is "
                                 f"gone ({where}): the guest is lost ({why})")
        await resume_source(self.route.src_qmp, self.rec.name,
                            switch_started=self.route.switch_started)
        self.rec.state = GuestState.RUNNING
        self.store.update_guest(self.rec)
        self.store.journal(self.mig_id, MigrationPhase.FAILED, error=why)
        return True

    async def _dest_never_ran(self) -> bool:
        """Whether the destination certainly never ran the guest: it is gone, or it stays
        waiting for its stream (``inmigrate``) over a second (a source that handed over
        completes a moment before its destination runs)."""
        for _ in range(5):
            alive, state = await self.route.dest_state()
            if not alive:
                return True
            if state != "inmigrate":
                return False
            await asyncio.sleep(0.25)
        return True

    def _needs_action(self, why: str) -> None:
        self.rec.state = GuestState.NEEDS_ACTION
        self.store.update_guest(self.rec)
        self.store.journal(self.mig_id, MigrationPhase.FAILED, error=why)

