"""Settings: where state lives, which QEMU and accelerator to use, where guest images are.

Every field can be set from the environment (``VMBEAM_*``) so that the CLI, the tests and the
Python API agree without passing options through every layer.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
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
    value = os.environ.get(var) or default.value  # empty means unset
    try:
        return kind(value)
    except ValueError:
        raise BadInputError(f"{var}={value!r}: use one of "
                            f"{', '.join(m.value for m in kind)}") from None


def _default_state_dir() -> Path:
    # An empty VMBEAM_STATE_DIR means unset, not Path("") (the current directory).
    return Path(os.environ.get("VMBEAM_STATE_DIR") or "/var/lib/vmbeam-kvm")


# A namespace name is a file name under /run/netns: no '/', no leading '.' or '-'.
_NETNS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Cloud VMs get .2 upwards and guests .100 to .250 (nested.CloudOps): at least a /24.
_LAB_MAX_PREFIX = 24


def check_lab_network(ns: str, subnet: str) -> None:
    """Refuse a lab namespace or subnet that could not be built, before anything is."""
    if not isinstance(ns, str) or not _NETNS_RE.fullmatch(ns):
        raise BadInputError(f"invalid lab namespace {ns!r} (VMBEAM_LAB_NS): use 1-64 letters, "
                            f"digits, '.', '_' or '-', starting with a letter or digit")
    try:
        net = ipaddress.IPv4Network(subnet)
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"invalid lab subnet {subnet!r} (VMBEAM_LAB_SUBNET): "
                            f"{exc}") from None
    if net.prefixlen > _LAB_MAX_PREFIX:
        raise BadInputError(f"lab subnet {subnet} (VMBEAM_LAB_SUBNET) is too small: use a "
                            f"/{_LAB_MAX_PREFIX} or larger")


def prefault_connect_timeout(memory: int) -> float:
    """How long a prefaulting destination QEMU may take to open QMP: 20 s plus 10 s per
    GiB (it maps all of the region first; 16 GiB took over 20 s on 2 busy cores)."""
    return 20.0 + 10.0 * memory / (1 << 30)


# `make qemu` (scripts/build-qemu.sh) links the patched QEMU here (README "Patched QEMU").
PATCHED_QEMU = REPO_ROOT / "build" / "qemu" / "qemu-system-x86_64"


def _default_qemu() -> str:
    """VMBEAM_QEMU if set, else the patched QEMU if built, else the distribution's."""
    env = os.environ.get("VMBEAM_QEMU")
    if env:
        return env
    return str(PATCHED_QEMU) if PATCHED_QEMU.exists() else "qemu-system-x86_64"


def _default_images_dir() -> Path:
    return Path(os.environ.get("VMBEAM_IMAGES_DIR", str(REPO_ROOT / "build" / "images")))


@dataclass(frozen=True)
class Settings:
    """Process-wide configuration of a vmbeam-kvm host."""

    state_dir: Path = field(default_factory=_default_state_dir)
    qemu_binary: str = field(default_factory=_default_qemu)
    accel: Accel = field(default_factory=lambda: _enum_env(Accel, "VMBEAM_ACCEL", Accel.AUTO))
    images_dir: Path = field(default_factory=_default_images_dir)
    # The lab network of cloud VMs: a namespace of our own and a subnet inside it only.
    # Empty (the default): a namespace of this state directory's own (lab_namespace).
    lab_ns: str = field(default_factory=lambda: os.environ.get("VMBEAM_LAB_NS", ""))
    lab_subnet: str = field(
        default_factory=lambda: os.environ.get("VMBEAM_LAB_SUBNET", "10.203.0.0/24"))
    # Nested migrations cross a network other cloud VMs share: TLS with a per-migration
    # pre-shared key keeps them from feeding or reading the stream.
    migration_tls: MigrationTLS = field(default_factory=lambda: _enum_env(
        MigrationTLS, "VMBEAM_MIGRATION_TLS", MigrationTLS.AUTO))

    # How cloud VMs (L1) are built under TCG; see cloudvm.TcgTuning for the measured choice.
    cloudvm_tcg: str = field(default_factory=lambda: os.environ.get("VMBEAM_CLOUDVM_TCG", ""))

    @property
    def lab_owner(self) -> str:
        """Who a lab network belongs to: this state directory, as an absolute path (one
        state directory reached by two spellings is one owner)."""
        return str(self.state_dir.resolve())

    @property
    def lab_namespace(self) -> str:
        """The lab's namespace: ``lab_ns`` when set, else ``vmbeam-lab-<digest of the state
        directory>``, so two state directories never share one."""
        if self.lab_ns:
            return self.lab_ns
        digest = hashlib.sha256(self.lab_owner.encode()).hexdigest()
        return f"vmbeam-lab-{digest[:10]}"

    def check_lab(self) -> None:
        """Raise :class:`BadInputError` unless the lab namespace and subnet are usable."""
        check_lab_network(self.lab_namespace, self.lab_subnet)

    def resolve_qemu(self, binary: str | None = None) -> str:
        """Return the absolute path of a QEMU binary, or raise a clear error."""
        name = binary or self.qemu_binary
        path = shutil.which(name)
        if path is None:
            raise BadInputError(f"QEMU binary {name!r} not found (install qemu-system-x86 or "
                                f"pass an existing path)")
        return path


# ---- Tunables: every timeout, rate and range in one place ---------------------------------
# Precopy: QEMU's 128 MiB/s default bandwidth is far too low for a move on one host.
PRECOPY_MAX_BANDWIDTH = 64 << 30
# From `migrate` to the source's `completed`: zero-copy and cpr-transfer move only device
# state; precopy gets a base plus a share per GiB of guest RAM.
HANDOVER_TIMEOUT = {"local": 30.0, "cloud-vm": 60.0}
PRECOPY_TIMEOUT = {"local": (60.0, 30.0), "cloud-vm": (120.0, 120.0)}  # (base, per GiB)
DISK_MIRROR_TIMEOUT = 300.0  # a precopy's disk mirror: until in step, and to finish
# After the source completed: how long the destination may take to report `running`.
CONFIRM_TIMEOUT = 30.0
# Crash recovery: how long a destination seen `inmigrate` may take to settle.
SETTLE_TIMEOUT = 10.0
# Nested precopy: a TCG guest dirties pages faster than the L1-L1 link carries them.
NESTED_DOWNTIME_LIMIT_MS = 500
# Cloud VMs: boot deadline (then restarted once), eject deadline of a hot-unplugged region,
# how long a command waits for an agent channel another command holds, default call limit.
CLOUD_VM_BOOT_TIMEOUT = 120.0
REGION_EJECT_TIMEOUT = 60.0
# Relocation with a revoking QEMU: the source agent gets this long to quit the source L2
# (its cloud VM may be hung: the memory is already revoked), and the eject asked for
# afterwards is looked at for this long before the move reports it pending.
SOURCE_QUIT_TIMEOUT = 3.0
EJECT_GRACE = 3.0
AGENT_LOCK_WAIT = 180.0
AGENT_CALL_TIMEOUT = 60.0


def agent_call_timeout() -> float:
    """How long one call to a cloud VM's agent (or to a cloud VM's QEMU on L0) may take
    before that end counts as not answering: ``VMBEAM_AGENT_CALL_TIMEOUT`` seconds if set
    (tests of a paused cloud VM shorten it), else :data:`AGENT_CALL_TIMEOUT`."""
    value = os.environ.get("VMBEAM_AGENT_CALL_TIMEOUT") or ""
    try:
        seconds = float(value) if value else AGENT_CALL_TIMEOUT
    except ValueError:
        raise BadInputError(f"VMBEAM_AGENT_CALL_TIMEOUT={value!r}: use a number of "
                            f"seconds") from None
    if not 0 < seconds < 1e6:
        raise BadInputError(f"VMBEAM_AGENT_CALL_TIMEOUT={value!r}: use a positive number "
                            f"of seconds")
    return seconds


# A source whose cloud VM stopped answering during a move is looked at this long by each
# later command (Host open) before the guest stays `unreachable` for now.
UNREACHABLE_PROBE_TIMEOUT = 3.0
# Lab addresses (host indexes in the lab subnet): cloud VMs count up from .2, guests in
# cloud VMs from .100, both up to .250.
LAB_CLOUD_VM_HOSTS = range(1, 250)
LAB_GUEST_HOSTS = range(99, 250)
