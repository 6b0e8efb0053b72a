"""What a move is asked to do and what it reports: modes, options, progress, result.

These are the public types of the migration engine (re-exported by :mod:`vmbeam_kvm`); the
result's ``to_json`` is the CLI's ``--json`` object, a contract scripts rely on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from ..config import PRECOPY_MAX_BANDWIDTH


class MigrationMode(StrEnum):
    """How guest RAM reaches the destination."""

    ZERO_COPY = "zero-copy"
    PRECOPY = "precopy"
    CPR_TRANSFER = "cpr-transfer"
    # Resolved to one of the above before the move starts (migrate.choose_mode), with the
    # reason in MigrationResult.mode_reason.
    AUTO = "auto"


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a move as it happens.

    ``kind`` is ``phase`` (``phase`` was entered; ``last_phase_ms`` is how long the one
    before it took) or ``ram`` (the source's transfer figures while it streams). RAM
    figures are bytes; ``dirty_rate`` pages per second; ``expected_downtime_ms`` QEMU's
    estimate for precopy.
    """

    guest: str
    kind: str
    phase: str
    elapsed_ms: float
    last_phase_ms: float | None = None
    ram_total: int = 0
    ram_transferred: int = 0
    ram_remaining: int = 0
    dirty_rate: int = 0
    expected_downtime_ms: int | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class MigrationOptions:
    """Knobs of one move. ``qemu`` and ``timeout`` apply to moves on this host."""

    mode: MigrationMode = MigrationMode.ZERO_COPY
    qemu: str | None = None              # destination QEMU binary (live update)
    timeout: float | None = None         # limit before the switch; default depends on size
    max_bandwidth: int = PRECOPY_MAX_BANDWIDTH
    verify_guest: bool = True            # wait for a good heartbeat on the destination
    guest_timeout: float = 30.0
    compare_frames: bool = True
    progress: ProgressCallback | None = None  # sees every ProgressEvent of the move
    # Measure the pause the guest sees around the switch from its ticks (vmbeam_kvm.ticks).
    measure_pause: bool = True
    # Zero-copy on this host: the destination QEMU maps (prefaults) all of the guest's
    # memory before the switch (prealloc with MADV_POPULATE_WRITE: contents untouched),
    # so the guest does not fault its pages in after it. Pages the guest never touched
    # are allocated (zeroed) too.
    prefault: bool = False
    # > 0: also its work rate over `tail_window` s right after the switch against as long a
    # window before the move (post_switch_slowdown); the move takes about 2x this longer
    # (in command_ms; not in total_ms).
    tail_window: float = 0.0


@dataclass
class MigrationResult:
    """What a move did and what it cost; ``to_json`` is the CLI's ``--json`` object.

    The ``source_cloud_vm`` ... ``l0_cpu_seconds`` fields describe moves between cloud VMs
    and are None for moves on this host.
    """

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
    # Between cloud VMs only:
    source_cloud_vm: str | None = None
    dest_cloud_vm: str | None = None
    source_detached: bool | None = None
    network_bytes: int | None = None   # bytes that crossed the destination cloud VM's NIC
    tls: bool | None = None            # the stream was TLS with a per-move pre-shared key
    l0_cpu_seconds: float | None = None  # CPU of every QEMU on L0 (the cloud VMs) meanwhile
    # The device of the region is gone from the source cloud VM (its eject completed); with
    # a revoking QEMU `source_detached` holds before the eject, from L0's own view.
    source_ejected: bool | None = None
    source_revoked_ms: float | None = None  # from the handover until the source lost access
    # The same for its disks (between cloud VMs: L0 unplugged them from the source).
    source_disks_revoked_ms: float | None = None
    # Zero-copy: QEMU itself checked that the destination maps the source's shared RAM
    # (patched QEMU, both ends); False where a QEMU lacks the check, None for other modes.
    shared_ram_checked: bool | None = None
    guarantees_missing: list[str] = field(default_factory=list)
    # The whole move as its caller waits for it: from the request (checked under the
    # guest's lock) to the result, share and prepare included (total_ms is switch+confirm);
    # the time spent only to measure post_switch_slowdown (tail_window) is left out.
    command_ms: float = 0.0
    # From the guest's ticks on L0's clock (vmbeam_kvm.ticks); None where the guest sends
    # none (the Linux image, a guest started by an earlier release) or measure_pause is off.
    # Why this mode: "requested", or what `auto` saw (co-location, the RAM backend).
    mode_reason: str | None = None
    pause_ms: float | None = None             # the longest gap around the switch
    post_switch_slowdown: float | None = None  # work rate after / before (tail_window)
    # The guest's disks: each {id, mode shared|copied, bytes_copied}.
    disks: list[dict[str, Any]] = field(default_factory=list)
    disk_bytes_copied: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# The result of a move between cloud VMs: the same type (kept as a name for the API).
NestedResult = MigrationResult
