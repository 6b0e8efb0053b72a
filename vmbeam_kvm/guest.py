"""Guests: the L2 virtual machines vmbeam-kvm runs and moves.

A :class:`Guest` is a handle on a guest recorded in the state store; the QEMU process behind
it changes with every move, and runs on this host or inside a cloud VM — the handle asks the
guest's placement (:mod:`vmbeam_kvm.placement`) either way. As an async context manager it
stops the guest on exit (unless :meth:`Guest.detach` was called), so scripts never leak
guests.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from .config import Settings
from .errors import BadInputError, LaunchError, QMPCommandError
from .heartbeat import Heartbeat, read_status
from .migrate.model import MigrationMode, MigrationOptions, MigrationResult
from .migrate.settle import SettleResult
from .placement import GuestStatus, Placement
from .store import GuestRecord, GuestState, Store


class GuestOwner(Protocol):
    """What a :class:`Guest` needs of the host that owns it (the façade's own API)."""

    settings: Settings

    @property
    def store(self) -> Store: ...

    def placement(self, rec: GuestRecord) -> Placement: ...

    async def status(self, name: str) -> GuestStatus: ...

    async def migrate(self, name: str, options: MigrationOptions | None = None
                      ) -> MigrationResult: ...

    async def move(self, name: str, to: str, mode: MigrationMode | None = None
                   ) -> MigrationResult: ...

    async def stop_guest(self, name: str, *, missing_ok: bool = False) -> None: ...

    async def settle_guest(self, name: str) -> SettleResult: ...


class Guest:
    """Handle on one guest of a :class:`~vmbeam_kvm.host.Host`."""

    def __init__(self, host: GuestOwner, name: str) -> None:
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
        """Wait for the guest's first heartbeat (its memory is filled by then); raises
        LaunchError when none comes within ``timeout``."""
        hb = await self.wait_heartbeat(-1, timeout)
        if hb is None:
            st = await self.status()
            raise LaunchError(f"guest {self.name!r} sent no heartbeat within {timeout:.0f} s "
                              f"(QEMU {'running' if st.alive else 'exited'})")
        return hb

    async def wait_heartbeat(self, after_seq: int, timeout: float = 30.0) -> Heartbeat | None:
        """The first heartbeat newer than ``after_seq``, or None after ``timeout``."""
        rec = self.record
        return await self.host.placement(rec).wait_heartbeat(rec, after_seq, timeout)

    def heartbeat(self) -> Heartbeat | None:
        """The latest heartbeat in the serial log (guests on this host; for a guest in a
        cloud VM use ``(await guest.status()).heartbeat``); BadInputError otherwise."""
        if self.record.cloud_vm:
            raise BadInputError(f"guest {self.name!r} runs in a cloud VM: its serial log is "
                                f"there; use status()")
        return read_status(self.serial_path).heartbeat

    async def qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run a QMP command on the QEMU that currently runs the guest (through the cloud
        VM's agent when it runs in one); raises QMPCommandError (AgentError in a cloud
        VM) when it fails."""
        rec = self.record
        if rec.state not in (GuestState.RUNNING, GuestState.MIGRATING):
            raise QMPCommandError(f"guest {self.name!r} is {rec.state.value}", command=cmd)
        return await self.host.placement(rec).qmp(rec, cmd, args)

    async def migrate(self, options: MigrationOptions | None = None) -> MigrationResult:
        """Move a guest of this host to a new QEMU on this host."""
        return await self.host.migrate(self.name, options)

    async def move_to(self, cloud_vm: str, mode: MigrationMode | None = None
                      ) -> MigrationResult:
        """Move a guest in a cloud VM to cloud VM ``cloud_vm`` (``mode`` None = auto)."""
        return await self.host.move(self.name, cloud_vm, mode)

    async def settle(self) -> SettleResult:
        """Keep the one copy of a ``needs-action`` or ``unreachable`` guest that runs with a
        good memory verdict, stop the other (:meth:`Host.settle_guest`)."""
        return await self.host.settle_guest(self.name)

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


__all__ = ["Guest", "GuestOwner", "GuestStatus"]
