"""Guests: the L2 virtual machines vmbeam-kvm runs and moves, and their status.

A :class:`Guest` is a handle on a guest recorded in the state store; the QEMU process behind
it changes with every migration. As an async context manager it stops the guest on exit
(unless :meth:`Guest.detach` was called), so scripts never leak guests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import LaunchError, QMPCommandError
from .heartbeat import Heartbeat, read_status, wait_for_heartbeat
from .store import GuestRecord, GuestState

if TYPE_CHECKING:
    from .host import Host
    from .migration import MigrationOptions, MigrationResult


@dataclass(frozen=True)
class GuestStatus:
    """A guest's recorded state, its QEMU's run state and its latest heartbeat."""

    name: str
    state: str
    image: str
    memory_bytes: int
    touch_percent: int
    accel: str
    pid: int
    alive: bool
    run_state: str | None
    booted: bool
    ready: bool
    heartbeat: Heartbeat | None
    memory_ok: bool | None
    region_id: str
    instance: int
    serial_log: str
    cloud_vm: str = ""
    tenant: str = ""
    ip: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Guest:
    """Handle on one guest of a :class:`~vmbeam_kvm.host.Host`."""

    def __init__(self, host: Host, name: str) -> None:
        self.host = host
        self.name = name
        self._detached = False

    @property
    def record(self) -> GuestRecord:
        return self.host.store.get_guest(self.name)

    @property
    def serial_path(self) -> Path:
        return Path(self.record.serial_path)

    async def status(self) -> GuestStatus:
        return await self.host.status(self.name)

    async def wait_ready(self, timeout: float = 120.0) -> Heartbeat:
        """Wait for the guest's first heartbeat (its memory is filled by then)."""
        hb = await wait_for_heartbeat(self.serial_path, timeout=timeout)
        if hb is None:
            rec = self.record
            alive = self.host.process(rec).alive()
            raise LaunchError(f"guest {self.name!r} sent no heartbeat within {timeout:.0f} s "
                              f"(QEMU {'running' if alive else 'exited'})")
        return hb

    async def wait_heartbeat(self, after_seq: int, timeout: float = 30.0) -> Heartbeat | None:
        return await wait_for_heartbeat(self.serial_path, after_seq=after_seq, timeout=timeout)

    def heartbeat(self) -> Heartbeat | None:
        return read_status(self.serial_path).heartbeat

    async def qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run a QMP command on the QEMU that currently runs the guest."""
        rec = self.record
        if rec.state not in (GuestState.RUNNING, GuestState.MIGRATING):
            raise QMPCommandError(f"guest {self.name!r} is {rec.state.value}")
        return await self.host.process(rec).execute(cmd, args)

    async def migrate(self, options: MigrationOptions | None = None) -> MigrationResult:
        return await self.host.migrate(self.name, options)

    async def stop(self) -> None:
        await self.host.stop_guest(self.name)

    def detach(self) -> None:
        """Keep the guest running after the ``async with`` block."""
        self._detached = True

    async def __aenter__(self) -> Guest:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._detached:
            await self.host.stop_guest(self.name, missing_ok=True)

    def __repr__(self) -> str:
        return f"Guest({self.name!r})"
