"""vmbeam-kvm: zero-copy migration of QEMU/KVM guests between co-located VMs.

The Python API is async; start with :class:`Host`.
"""

from .config import Accel, Settings
from .errors import (
                     BadInputError,
                     DuplicateGuestError,
                     GuestBusyError,
                     GuestLostError,
                     LaunchError,
                     MigrationError,
                     QMPCommandError,
                     RegionError,
                     RegionMismatchError,
                     SettleRefusedError,
                     UnknownGuestError,
                     UnsafeStateError,
                     VmbeamError,
)
from .guest import Guest, GuestStatus
from .host import Host
from .migrate.model import (
    MigrationMode,
    MigrationOptions,
    MigrationResult,
    NestedResult,
    ProgressEvent,
)
from .migrate.settle import SettleResult
from .region import BeamRegion

__all__ = [
    "Accel", "BadInputError", "BeamRegion", "DuplicateGuestError", "Guest", "GuestBusyError",
    "GuestLostError", "GuestStatus", "Host", "LaunchError", "MigrationError", "MigrationMode",
    "MigrationOptions", "MigrationResult", "NestedResult", "ProgressEvent", "QMPCommandError",
    "RegionError", "RegionMismatchError", "Settings", "SettleRefusedError", "SettleResult",
    "UnknownGuestError", "UnsafeStateError", "VmbeamError",
]
