"""What a move carries besides the RAM region: resources that take part in every phase.

A :class:`Resource` has one hook per phase of the engine (:mod:`.engine`) — *share* (before
the destination exists), *prepare* (the destination answers QMP, waiting for its stream),
*switch* (the source is stopped at ``pre-switchover``: the last moment before device state
is final), *confirm* (the destination runs), *relocate* (the source QEMU is gone) and
*rollback* — and reports what it cost. The route calls them in order; the RAM region keeps
its own path in the routes for now, a disk is the first participant: :class:`DiskResource`
on this host, :class:`BeamDiskResource` between cloud VMs.

A disk moves one of two ways (README, "Disks"):

* ``shared`` (zero-copy, cpr-transfer): both QEMUs open the same file. QEMU's shared-storage
  semantics hand it over: the incoming QEMU opens its nodes *inactive* (no image lock held,
  nothing written or cached), the source inactivates its nodes when it completes (drops its
  write lock), the destination activates them when it starts (takes the write lock). Image
  locking stays on throughout, so the destination could not start while the source still
  held the file: never two writers.
* ``copied`` (precopy): the destination gets a new overlay on the same read-only backing,
  exported by its NBD server; the source mirrors its overlay into it (``blockdev-mirror``
  ``sync=top``: only what the guest wrote, the user's file being the backing of both — as
  libvirt's ``--copy-storage-inc``; ``copy-mode=write-blocking``: once ready, every guest
  write completes on both).
  At ``pre-switchover`` (guest stopped, device state not yet final) the mirror is completed
  without a pivot and disconnected, so nothing of the source writes the copy once the
  destination runs; its bytes are the mirror job's count.

Between cloud VMs (:class:`BeamDiskResource`) a disk is *shared* the VMBeam way: *share*
hot-plugs L0's file into the destination cloud VM, the two L2 QEMUs hand it over as above,
and *relocate* unplugs it from the source cloud VM on L0 at once — L0's QEMU of the source
then holds no fd of the file, whatever the source's kernel does; *rollback* unplugs it from
the destination.

The QEMU facts this rests on (who holds which lock byte when) are in docs/design.md §10 and §11.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from ..config import DISK_MIRROR_TIMEOUT
from ..disks import Disk, DiskMode, create_overlay
from ..errors import DiskError, VmbeamError

QMP = Callable[[str, "dict[str, Any] | None"], Awaitable[Any]]


class Resource(Protocol):
    """One participant of a move (see module docstring)."""

    id: str
    copies: bool  # it needs the source stopped at pre-switchover (switch hook)

    async def share(self) -> None: ...

    async def prepare(self) -> None: ...

    async def switch(self) -> None: ...

    async def confirm(self) -> None: ...

    async def relocate(self) -> None: ...

    async def rollback(self) -> None: ...

    def report(self) -> dict[str, Any]: ...


class NbdServer:
    """The destination QEMU's one NBD server (on a unix socket), started on first use."""

    def __init__(self, dst_qmp: QMP, sock: Path) -> None:
        self.dst_qmp, self.sock = dst_qmp, sock
        self.started = False

    async def ensure(self) -> None:
        if not self.started:
            with contextlib.suppress(FileNotFoundError):
                self.sock.unlink()
            await self.dst_qmp("nbd-server-start", {
                "addr": {"type": "unix", "data": {"path": str(self.sock)}}})
            self.started = True

    async def stop(self) -> None:
        if self.started:
            self.started = False
            with contextlib.suppress(VmbeamError):
                await self.dst_qmp("nbd-server-stop", None)
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()


class DiskResource:
    """One disk of a guest moving on this host (see module docstring)."""

    def __init__(self, disk: Disk, *, copied: bool, src_qmp: QMP, dst_qmp: QMP,
                 nbd: NbdServer, dest_path: Path) -> None:
        if copied and disk.mode != DiskMode.OVERLAY:
            raise DiskError(f"{disk.id} is written in place: it can only be shared")
        self.disk, self.copies = disk, copied
        self.id = disk.id
        self.src_qmp, self.dst_qmp, self.nbd = src_qmp, dst_qmp, nbd
        self.dest = disk.at(str(dest_path)) if copied else disk
        self.bytes_copied = 0
        self._mirror = False  # the source's mirror job and NBD client node exist
        self._exported = False

    @property
    def job(self) -> str:
        return f"mirror-{self.id}"

    @property
    def target(self) -> str:
        return f"{self.id}-mirror"

    async def share(self) -> None:
        if self.copies:
            create_overlay(Path(self.dest.path), Path(self.disk.user_file),
                           self.disk.user_format)

    async def prepare(self) -> None:
        """Copied: export the destination's overlay and mirror the source into it until
        the two are in step (the job is ready)."""
        if not self.copies:
            return
        await self.nbd.ensure()
        # Exporting activates the destination's (new, unshared) node for writing.
        await self.dst_qmp("block-export-add", {"type": "nbd", "id": f"exp-{self.id}",
                                                "node-name": self.id, "name": self.id,
                                                "writable": True})
        self._exported = True
        await self.src_qmp("blockdev-add", {
            "driver": "nbd", "node-name": self.target, "export": self.id,
            "server": {"type": "unix", "path": str(self.nbd.sock)}})
        self._mirror = True
        await self.src_qmp("blockdev-mirror", {
            "job-id": self.job, "device": self.id, "target": self.target, "sync": "top",
            "copy-mode": "write-blocking"})
        deadline = time.monotonic() + DISK_MIRROR_TIMEOUT
        while True:
            job = await self._job()
            if job is None or job.get("status") in ("aborting", "concluded", "null"):
                raise DiskError(f"mirror of {self.id} stopped: "
                                f"{(job or {}).get('error', 'job gone')}")
            if job.get("ready"):
                return
            if time.monotonic() > deadline:
                raise DiskError(f"mirror of {self.id} not ready in {DISK_MIRROR_TIMEOUT} s")
            await asyncio.sleep(0.02)

    async def _job(self) -> dict[str, Any] | None:
        for job in await self.src_qmp("query-block-jobs", None):
            if job.get("device") == self.job:
                return dict(job)
        return None

    async def switch(self) -> None:
        """Copied, the source stopped: finish the mirror (no pivot) and disconnect it."""
        if not self.copies:
            return
        job = await self._job()
        if job is None or not job.get("ready"):
            raise DiskError(f"mirror of {self.id} is not in step at the switchover")
        # The guest is stopped: what the job has copied now is all but in-flight requests.
        self.bytes_copied = int(job.get("offset", 0))
        # block-job-cancel of a ready mirror completes it: the last writes reach the copy.
        await self.src_qmp("block-job-cancel", {"device": self.job})
        deadline = time.monotonic() + DISK_MIRROR_TIMEOUT
        while (job := await self._job()) is not None:
            self.bytes_copied = max(self.bytes_copied, int(job.get("offset", 0)))
            if time.monotonic() > deadline:
                raise DiskError(f"mirror of {self.id} did not finish")
            await asyncio.sleep(0.005)
        await self.src_qmp("blockdev-del", {"node-name": self.target})
        self._mirror = False

    async def confirm(self) -> None:
        if self._exported:
            await self.dst_qmp("block-export-del", {"id": f"exp-{self.id}"})
            self._exported = False

    async def relocate(self) -> None:
        """The source is gone: its overlay, if the disk was copied away from it, goes."""
        if self.copies:
            with contextlib.suppress(FileNotFoundError):
                Path(self.disk.path).unlink()

    async def rollback(self) -> None:
        """The source keeps its disk; the copy (and the source's mirror of it) goes."""
        if self._mirror:
            with contextlib.suppress(VmbeamError):
                await self.src_qmp("block-job-cancel", {"device": self.job, "force": True})
            for _ in range(200):
                with contextlib.suppress(VmbeamError):
                    if await self._job() is None:
                        break
                await asyncio.sleep(0.01)
            with contextlib.suppress(VmbeamError):
                await self.src_qmp("blockdev-del", {"node-name": self.target})
            self._mirror = False
        if self.copies:
            with contextlib.suppress(FileNotFoundError):
                Path(self.dest.path).unlink()

    def report(self) -> dict[str, Any]:
        return {"id": self.id, "mode": "copied" if self.copies else "shared",
                "bytes_copied": self.bytes_copied}


class BeamDiskResource:
    """One disk of a guest moving between cloud VMs, shared (see module docstring): L0
    plugs the same file into the destination cloud VM, and takes it from the source."""

    copies = False

    def __init__(self, disk: Disk, *, plug_dst: Callable[[], Awaitable[None]],
                 unplug_src: Callable[[], Awaitable[None]],
                 unplug_dst: Callable[[], Awaitable[None]]) -> None:
        self.disk, self.id = disk, disk.id
        self._plug_dst, self._unplug_src, self._unplug_dst = plug_dst, unplug_src, unplug_dst
        self.plugged = False

    async def share(self) -> None:
        self.plugged = True  # before the plug: a half-made plug is undone by rollback
        await self._plug_dst()

    async def prepare(self) -> None:
        return None

    async def switch(self) -> None:
        return None

    async def confirm(self) -> None:
        return None

    async def relocate(self) -> None:
        await self._unplug_src()

    async def rollback(self) -> None:
        if self.plugged:
            await self._unplug_dst()
            self.plugged = False

    def report(self) -> dict[str, Any]:
        return {"id": self.id, "mode": "shared", "bytes_copied": 0}
