"""Settings: where state lives, which QEMU and accelerator to use, where guest images are.

Every field can be set from the environment (``VMBEAM_*``) so that the CLI, the tests and the
Python API agree without passing options through every layer.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from .errors import BadInputError

REPO_ROOT = Path(__file__).resolve().parent.parent


class Accel(StrEnum):
    """Accelerator choice; AUTO is resolved by a real probe (see :mod:`vmbeam_kvm.accel`)."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class MigrationTLS(StrEnum):
    """When nested migration streams use TLS.

    AUTO protects zero-copy streams (device state only, ~300 KB: the handshake costs well
    under a second) and leaves precopy plain: under TCG a cloud VM moves TLS bulk data more
    than ten times slower (a 128M precopy did not converge in 135 s, 10 s plain).
    """

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    def applies(self, zero_copy: bool) -> bool:
        return self is MigrationTLS.ON or (self is MigrationTLS.AUTO and zero_copy)


_E = TypeVar("_E", bound=StrEnum)


def _enum_env(kind: type[_E], var: str, default: _E) -> _E:
    value = os.environ.get(var, default.value)
    try:
        return kind(value)
    except ValueError:
        raise BadInputError(f"{var}={value!r}: use one of "
                            f"{', '.join(m.value for m in kind)}") from None


def _default_state_dir() -> Path:
    return Path(os.environ.get("VMBEAM_STATE_DIR", "/var/lib/vmbeam-kvm"))


def _default_images_dir() -> Path:
    return Path(os.environ.get("VMBEAM_IMAGES_DIR", str(REPO_ROOT / "build" / "images")))


@dataclass(frozen=True)
class Settings:
    """Process-wide configuration of a vmbeam-kvm host."""

    state_dir: Path = field(default_factory=_default_state_dir)
    qemu_binary: str = field(
        default_factory=lambda: os.environ.get("VMBEAM_QEMU", "qemu-system-x86_64"))
    accel: Accel = field(default_factory=lambda: Accel(os.environ.get("VMBEAM_ACCEL", "auto")))
    images_dir: Path = field(default_factory=_default_images_dir)
    # The lab network of cloud VMs: a namespace of our own and a subnet inside it only.
    lab_ns: str = field(default_factory=lambda: os.environ.get("VMBEAM_LAB_NS", "vmbeam-lab"))
    lab_subnet: str = field(
        default_factory=lambda: os.environ.get("VMBEAM_LAB_SUBNET", "10.203.0.0/24"))
    # Nested migrations cross a network other cloud VMs share: TLS with a per-migration
    # pre-shared key keeps them from feeding or reading the stream.
    migration_tls: MigrationTLS = field(default_factory=lambda: _enum_env(
        MigrationTLS, "VMBEAM_MIGRATION_TLS", MigrationTLS.AUTO))

    def resolve_qemu(self, binary: str | None = None) -> str:
        """Return the absolute path of a QEMU binary, or raise a clear error."""
        name = binary or self.qemu_binary
        path = shutil.which(name)
        if path is None:
            raise BadInputError(f"QEMU binary {name!r} not found (install qemu-system-x86 or "
                                f"pass an existing path)")
        return path
