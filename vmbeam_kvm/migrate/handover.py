"""The handover rules both topologies share: when a source has handed a guest over, how
to wait for it, and when a source may run again.

Every function takes the source's (and destination's) QMP as a :data:`QMPExecute` — a
direct session on this host or a round trip through a cloud VM's agent — so one rule holds
for every placement (docs/design.md §4.6, §7.15).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..errors import MigrationError, Rollback, VmbeamError
from ..store import MigrationPhase

# Journaled phases in which the source may have been asked to migrate.
SWITCH_STARTED = (MigrationPhase.SWITCH, MigrationPhase.CONFIRM, MigrationPhase.RELOCATE)

QMPExecute = Callable[[str, "dict[str, Any] | None"], Awaitable[Any]]


class DestWatch(Protocol):
    """What the handover wait needs of a destination QEMU it can watch directly."""

    def alive(self) -> bool: ...

    def log_tail(self, lines: int = 5) -> str: ...


async def wait_for_handover(execute: QMPExecute, timeout: float, *,
                            dst: DestWatch | None = None, poll: float = 0.001,
                            on_info: Callable[[dict[str, Any]], None] | None = None,
                            on_switchover: Callable[[], Awaitable[None]] | None = None
                            ) -> dict[str, Any]:
    """Poll the source (through ``execute``) until its migration completes; return its
    final ``query-migrate``. Raises :class:`Rollback` when it fails, times out, or ``dst``
    (a watch on a destination QEMU of this host, when there is one) dies; the migration is
    cancelled first where the source would not stop by itself. ``on_info`` sees every
    ``query-migrate`` answer (progress). ``on_switchover`` runs once when the source
    stops at ``pre-switchover`` (capability ``pause-before-switchover``, set only with it):
    it must let the migration continue; its VmbeamError cancels the move (Rollback)."""
    start = time.monotonic()
    dst_dead_at: float | None = None
    delay = poll
    while True:
        try:
            info: dict[str, Any] = await execute("query-migrate", None)
        except VmbeamError as exc:
            raise Rollback(f"lost the source's QMP during the switch: {exc}") from exc
        status = info.get("status")
        if on_info is not None:
            on_info(info)
        if status == "completed":
            return info
        if status == "pre-switchover" and on_switchover is not None:
            hook, on_switchover = on_switchover, None
            try:
                await hook()
            except VmbeamError as exc:
                await _cancel(execute)
                raise Rollback(f"at the switchover: {exc}") from exc
            continue
        if status in ("failed", "cancelled"):
            why = info.get("error-desc", status)
            if dst is not None and await dies_within(dst, 1.0):
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


async def dies_within(proc: DestWatch, seconds: float) -> bool:
    """Whether ``proc`` is, or within ``seconds`` is, gone: a killed QEMU's sockets close
    (and the source fails) a moment before the process is seen dead."""
    deadline = time.monotonic() + seconds
    while proc.alive():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True

_IN_FLIGHT = ("active", "setup", "device", "pre-switchover", "cancelling")
# How long a cancelled outgoing migration may take to end.
OUTGOING_END_TIMEOUT = 30.0


def handed_over(info: dict[str, Any]) -> bool:
    """Whether a source's ``query-migrate`` shows an *outgoing* migration that completed.

    A QEMU that itself arrived by migration reports that incoming migration as
    ``completed`` too, but without the source-side times (``total-time``), which QEMU fills
    in for every outgoing migration it ran (docs/design.md §7.15).
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


async def end_outgoing(execute: QMPExecute, timeout: float = OUTGOING_END_TIMEOUT
                       ) -> dict[str, Any]:
    """Cancel a source's outgoing migration still in flight and wait until it has ended
    (a source continued after a pause finds out late that its peer is gone); returns its
    last ``query-migrate``. MigrationError when it is still in flight after ``timeout``:
    a source that cannot start a new migration is not settled yet."""
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = await execute("query-migrate", None)
    while info.get("status") in _IN_FLIGHT:
        if info.get("status") != "cancelling":
            await execute("migrate_cancel", None)
        if time.monotonic() > deadline:
            raise MigrationError(f"the source's outgoing migration is still "
                                 f"{info.get('status')} after {timeout:.0f} s",
                                 source_resumed=False)
        await asyncio.sleep(0.05)
        info = await execute("query-migrate", None)
    return info


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
        info = await end_outgoing(execute)
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
