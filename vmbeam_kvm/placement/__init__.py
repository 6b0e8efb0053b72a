"""Placements: where a guest's QEMU runs and how to reach it.

A guest runs either on this host (:class:`~.local.LocalPlacement`: a QEMU process here,
reached over its QMP socket) or inside a cloud VM (:class:`~.cloud.CloudOps`: an L2 QEMU
reached through that cloud VM's agent, its RAM a region hot-plugged there). The host façade
and :class:`~vmbeam_kvm.guest.Guest` ask the guest's placement; the migration engine takes
a placement's steps for the topology-specific phases.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ..heartbeat import Heartbeat
from ..store import GuestRecord


@dataclass(frozen=True)
class GuestStatus:
    """A guest's recorded state, its QEMU's run state and its latest heartbeat, as its
    placement reports them (``to_json`` is ``guest status --json``)."""

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
    # Another command holds the guest (a move in flight): its QEMU was not asked, so
    # run_state (and, in a cloud VM, the heartbeat) are unknown rather than waited for.
    busy: bool = False
    cpus: int = 1
    disks: list[dict[str, Any]] = field(default_factory=list)  # Disk.to_json of each
    # The Linux guest's disk workload: the newest record it made durable, by disk serial
    # (vmbeam_kvm.diskcheck); empty where it runs none.
    disk_acks: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Placement(Protocol):
    """What every placement answers for a guest recorded in the store."""

    async def status(self, rec: GuestRecord, *, busy: bool = False) -> GuestStatus:
        """The guest's recorded state and what its QEMU reports (records ``lost`` when it
        is certainly gone); ``busy``: another command holds the guest, so its QEMU is not
        asked (that would wait for the other command) and nothing is recorded."""
        ...

    async def stop(self, rec: GuestRecord) -> None:
        """Stop every copy of the guest and release its regions; forget it."""
        ...

    async def qmp(self, rec: GuestRecord, cmd: str, args: dict[str, Any] | None = None
                  ) -> Any:
        """Run a QMP command on the QEMU that currently runs the guest."""
        ...

    async def heartbeat(self, rec: GuestRecord) -> Heartbeat | None:
        """The guest's latest heartbeat."""
        ...

    async def wait_heartbeat(self, rec: GuestRecord, after_seq: int = -1,
                             timeout: float = 120.0) -> Heartbeat | None:
        """The first heartbeat newer than ``after_seq``, or None after ``timeout``."""
        ...


__all__ = ["GuestStatus", "Placement"]
