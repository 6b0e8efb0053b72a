"""Checks of new guests and cloud VMs: everything refused before anything is recorded,
created or started (bad input exits 2 and changes nothing)."""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .cloudvm import ROOT_PORT_WINDOW
from .config import check_lab_network
from .errors import BadInputError, DuplicateGuestError, UnknownGuestError
from .store import GuestRecord, GuestState, Store
from .units import PAGE_SIZE, check_name, format_size, parse_size, shown

if TYPE_CHECKING:
    from .net import LabNetwork

MIN_MEMORY = 32 << 20
# A floor far below the lab's 2G: smaller sizes (0, "256" meant as MiB) are refused as the
# typos they are rather than left to time out booting Debian, python3 and an L2 QEMU.
MIN_CLOUD_VM_MEMORY = 256 << 20
MAX_CPUS = 64
# A cloud VM's tap is "tap-<name>" and interface names hold 15 characters: longer names
# would collide once cut.
CLOUD_VM_NAME_MAX = 11
MAX_SOCKET_PATH = 107
# Room for the instance number in "qmp-<instance>.sock": it grows with every migration.
INSTANCE_DIGITS = 6


def check_cpus(cpus: object) -> int:
    """A vCPU count (1..MAX_CPUS), or :class:`BadInputError`."""
    if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= MAX_CPUS:
        raise BadInputError(f"invalid CPU count {shown(cpus)}: use 1-{MAX_CPUS}")
    return cpus


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse ``what`` unless ``folder`` (or, not made yet, the nearest folder above it) has
    ``need`` bytes free and 1 GiB to spare."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need and free < need + (1 << 30):
        raise BadInputError(f"{what} writes {need / 1e9:.1f} GB into {folder}: only "
                            f"{free / 1e9:.1f} GB free there")


def mem_available() -> int:
    """Host memory available for new guests (MemAvailable), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def check_size(memory: int | str, minimum: int, what: str) -> int:
    """Parse a RAM size and refuse it unless page-aligned, at least ``minimum`` and no more
    than the host has available; ``what`` names it in the error."""
    size = parse_size(memory)
    if size % PAGE_SIZE:
        raise BadInputError(f"{what} {size} is not a multiple of the page size "
                            f"({PAGE_SIZE} bytes)")
    if size < minimum:
        raise BadInputError(f"{what} {format_size(size)} is below the minimum of "
                            f"{minimum >> 20} MiB")
    avail = mem_available()
    if size > avail:
        raise BadInputError(f"{what} {size >> 20} MiB exceeds the host's available "
                            f"memory ({avail >> 20} MiB)")
    return size


def check_guest_memory(memory: int | str, *, in_cloud_vm: bool = False) -> int:
    """Parse and check a new guest's RAM size; raise :class:`BadInputError` if unusable.

    In a cloud VM the region (RAM + identity page) is rounded up to a power of two and must
    fit one hot-plug root port's 64-bit window.
    """
    size = parse_size(memory)
    if in_cloud_vm and size % PAGE_SIZE == 0 and size >= MIN_MEMORY:
        window = parse_size(ROOT_PORT_WINDOW)
        region = 1 << (size + PAGE_SIZE - 1).bit_length()
        if region > window:
            raise BadInputError(f"memory size {format_size(size)} does not fit a cloud VM: its "
                                f"region ({format_size(region)}, RAM + identity page rounded "
                                f"up to a power of two) exceeds the {ROOT_PORT_WINDOW} "
                                f"hot-plug window")
    return check_size(size, MIN_MEMORY, "memory size")


def check_socket_path(path: Path) -> None:
    if len(str(path)) > MAX_SOCKET_PATH:
        raise BadInputError(f"state directory path too long for a unix socket: {path} "
                            f"({len(str(path))} > {MAX_SOCKET_PATH} bytes)")


def check_new_guest(store: Store, name: str, memory: int, *, in_cloud_vm: bool = False
                    ) -> None:
    """Refuse a new guest's name and size before anything is recorded or started."""
    check_name(name, "name")
    check_guest_memory(memory, in_cloud_vm=in_cloud_vm)
    if not in_cloud_vm:
        check_socket_path(store.state_dir / "guests" / name
                          / f"qmp-{'9' * INSTANCE_DIGITS}.sock")
    with contextlib.suppress(UnknownGuestError):
        store.get_guest(name)
        raise DuplicateGuestError(f"a guest named {name!r} already exists")


def check_new_cloud_vm(store: Store, name: str, tenant: str, memory: int | str, cpus: int,
                       lab: LabNetwork | None = None) -> int:
    """Refuse a new cloud VM before anything is recorded, created or started; returns its
    memory in bytes."""
    check_name(name, "cloud VM name", CLOUD_VM_NAME_MAX)
    if not tenant:
        raise BadInputError("a cloud VM needs a tenant")
    check_name(tenant, "tenant")
    size = check_size(memory, MIN_CLOUD_VM_MEMORY, "cloud VM memory")
    check_cpus(cpus)
    if lab is not None:
        check_lab_network(lab.ns, lab.subnet)
    check_socket_path(store.state_dir / "cloudvms" / name / "agent.sock")
    try:
        store.get_cloud_vm(name)
    except BadInputError:
        return size  # no such cloud VM yet: the name is free
    raise BadInputError(f"a cloud VM named {name!r} already exists")


MAX_TAIL_WINDOW = 10.0


def check_tail_window(window: object) -> None:
    """A move's ``tail_window``: 0 (pause only) up to 10 seconds."""
    if (isinstance(window, bool) or not isinstance(window, int | float)
            or not math.isfinite(window) or not 0 <= window <= MAX_TAIL_WINDOW):
        raise BadInputError(f"invalid tail window {window!r}: use 0 to {MAX_TAIL_WINDOW:g} "
                            f"seconds")


def check_movable(rec: GuestRecord) -> None:
    """Refuse to move a guest that is not running, saying what will make it movable."""
    if rec.state is GuestState.RUNNING:
        return
    hint = {
        GuestState.UNREACHABLE: f": its cloud VM {rec.cloud_vm} stopped answering during a "
                                f"move that never handed it over; it is running again as "
                                f"soon as {rec.cloud_vm} answers (any command sees to it), "
                                f"or see `vmbeam-kvm guest settle {rec.name}`",
        GuestState.NEEDS_ACTION: f": `vmbeam-kvm guest settle {rec.name}` keeps the copy "
                                 f"that runs with a good memory verdict",
    }.get(rec.state, "; only a running guest can be migrated")
    raise BadInputError(f"guest {rec.name!r} is {rec.state.value}{hint}")
