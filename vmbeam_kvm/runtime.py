"""The runtime context: what the engines and placements need of an open host, and no more.

A :class:`Runtime` holds the state store, the settings and the registry of QEMU processes
this command knows. The host façade builds one and hands it down; placements and the
migration engine receive it instead of the façade, so data flows one way
(CLI/API → host → placement / engine → QEMU, agent, store).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .config import Settings
from .qemu.process import ProcessRef, QemuProcess
from .store import Store

T = TypeVar("T")


@dataclass
class ProcessRegistry:
    """Handles on the QEMU processes this command launched or re-attached to (one per
    process, so that a QMP session is opened once and a launched child is reaped)."""

    _procs: dict[ProcessRef, QemuProcess] = field(default_factory=dict)

    def attach(self, ref: ProcessRef, qmp: Path, log: Path) -> QemuProcess:
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

    async def disconnect(self) -> None:
        """Close every QMP session (QEMU serves one client per socket); handles stay."""
        for proc in self._procs.values():
            await proc.close()

    async def close(self) -> None:
        await self.disconnect()
        self._procs.clear()


@dataclass
class Runtime:
    """Store, settings and process registry of one open host."""

    store: Store
    settings: Settings
    procs: ProcessRegistry = field(default_factory=ProcessRegistry)


async def to_the_end(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even when the caller is cancelled meanwhile (SIGINT/SIGTERM
    cancel the command once): a stop cut short would leave a QEMU without a record or a
    record without a QEMU. The cancellation is raised again once ``coro`` has ended."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller gets
        raise
