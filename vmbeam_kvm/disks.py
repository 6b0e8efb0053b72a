"""A guest's disks on this host: the user's files, the per-guest overlays, QEMU's
``-blockdev`` nodes and the image locks that keep one writer per file.

A disk is a qcow2 or raw file on L0. By default (:attr:`DiskMode.OVERLAY`) the user's file is
never written: the guest writes a qcow2 overlay in its state directory whose backing is the
user's file, opened read-only. With ``in-place`` the guest writes the user's file itself.
Each disk is a ``virtio-blk-pci`` device with serial ``vmbeam-<n>`` on a file node (with
``cache.direct=on`` where the filesystem takes O_DIRECT) and a format node, image locking
forced on.

QEMU's image locks are OFD locks on bytes 100+p ("I hold permission p") and 200+p ("I let
nobody else hold p") of the image file; permission 1 is *write*. :func:`lock_bytes` and
:func:`writers` read them from ``/proc``, which is how the checks here and the tests ask who
may write a file, rather than trusting the store.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import BadInputError, DiskError
from .units import shown

FORMATS = ("qcow2", "raw")
MAX_DISKS = 8
WRITE_HELD, WRITE_DENIED = 101, 201  # QEMU's lock bytes: a writer; one who forbids writers


class DiskMode(StrEnum):
    """Which file the guest writes."""

    OVERLAY = "overlay"    # a qcow2 overlay in the guest's state dir; the user's file read-only
    IN_PLACE = "in-place"  # the user's file itself


@dataclass(frozen=True)
class Disk:
    """One disk of a guest as its QEMU opens it (``to_json`` is its ``guest status`` entry)."""

    index: int
    path: str         # the file the guest writes: its overlay, or the user's file in place
    user_file: str    # the user's file (the overlay's read-only backing)
    user_format: str  # its format (qcow2 or raw)
    mode: str         # DiskMode
    direct: bool      # cache.direct=on (O_DIRECT) on the files

    @property
    def id(self) -> str:
        return f"disk{self.index}"

    @property
    def serial(self) -> str:
        return f"vmbeam-{self.index}"

    @property
    def format(self) -> str:
        """The format of :attr:`path`."""
        return "qcow2" if self.mode == DiskMode.OVERLAY else self.user_format

    def at(self, path: str) -> Disk:
        """The same disk written through another overlay (a copy's destination)."""
        return replace(self, path=path)

    def beam_serials(self, guest: str) -> tuple[str, str | None]:
        """The serials under which L0 plugs this disk's file (and its overlay's backing,
        read-only) into a cloud VM: unique per guest and disk, at most 20 characters."""
        h = hashlib.sha256(guest.encode()).hexdigest()[:10]
        return (f"vb{h}-{self.index}w",
                f"vb{h}-{self.index}r" if self.mode == DiskMode.OVERLAY else None)

    def wire(self, guest: str) -> dict[str, Any]:
        """What a cloud VM's agent needs to open this disk for the L2 (``from_wire``)."""
        top, base = self.beam_serials(guest)
        return {"index": self.index, "serial": top, "base_serial": base,
                "user_format": self.user_format, "mode": self.mode}

    @classmethod
    def from_wire(cls, d: dict[str, Any], path: str, base: str | None) -> Disk:
        """The disk as an L2 in a cloud VM opens it: the block devices ``path`` (and
        ``base``) that carry L0's files, through the L1's page cache: the L2's RAM is a
        PFN mapping of /dev/mem that O_DIRECT cannot DMA into (docs/design.md §11)."""
        return cls(int(d["index"]), path, base or path, str(d["user_format"]),
                   str(d["mode"]), False)

    def blockdev_args(self, *, boot: bool = False) -> list[str]:
        """``-blockdev`` (JSON: no escaping of paths) and ``-device`` arguments; ``boot``:
        the disk the firmware boots (bootindex 0)."""
        cache = {"direct": self.direct, "no-flush": False}

        def file_node(name: str, path: str, ro: bool) -> dict[str, Any]:
            # A block device: a beam disk as the agent found it in a cloud VM.
            driver = "host_device" if path.startswith("/dev/") else "file"
            # drop-cache (QEMU's default, said here because beam disks rely on it): an
            # incoming QEMU drops the page cache of its files when it activates them, so
            # nothing read before the source's last flush is served afterwards.
            return {"driver": driver, "node-name": name, "filename": path, "read-only": ro,
                    "locking": "on", "cache": cache, "drop-cache": True}

        nodes: list[dict[str, Any]] = []
        if self.mode == DiskMode.OVERLAY:
            base = f"{self.id}-base"
            nodes += [file_node(f"{base}-file", self.user_file, True),
                      {"driver": self.user_format, "node-name": base,
                       "file": f"{base}-file", "read-only": True}]
            top: dict[str, Any] = {"driver": "qcow2", "backing": base}
        else:
            top = {"driver": self.user_format}
        nodes += [file_node(f"{self.id}-file", self.path, False),
                  {**top, "node-name": self.id, "file": f"{self.id}-file", "read-only": False}]
        args: list[str] = []
        for node in nodes:
            args += ["-blockdev", json.dumps(node)]
        dev = f"virtio-blk-pci,drive={self.id},id={self.id}-dev,serial={self.serial}"
        if boot:
            dev += ",bootindex=0"
        return [*args, "-device", dev]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "serial": self.serial, "path": self.path,
                "user_file": self.user_file, "backing": (self.user_file if self.mode ==
                                                         DiskMode.OVERLAY else None),
                "format": self.format, "user_format": self.user_format, "mode": self.mode,
                "cache_direct": self.direct}


def dumps(disks: tuple[Disk, ...] | list[Disk]) -> str:
    """The store's form of a guest's disks."""
    return json.dumps([asdict(d) for d in disks])


def loads(text: str) -> tuple[Disk, ...]:
    return tuple(Disk(**d) for d in json.loads(text or "[]"))


# -- checks of new disks (bad input: nothing started) -------------------------------------
def image_format(path: Path) -> str:
    """The image format of ``path`` as qemu-img reads it (not locking: it only reads)."""
    try:
        out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BadInputError(f"cannot inspect disk {path}: {exc}") from None
    if out.returncode != 0:
        raise BadInputError(f"disk {path} is not a readable image: "
                            f"{out.stderr.strip().splitlines()[-1:]}")
    return str(json.loads(out.stdout)["format"])


def supports_direct(path: Path) -> bool:
    """Whether ``path``'s filesystem takes O_DIRECT (tmpfs does not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def _inode_key(path: Path) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def _lock_ranges(lines: list[str], key: str) -> set[int]:
    """The locked bytes 100-299 of the file ``key`` (maj:min:inode) in ``/proc/locks``
    lines (or an fdinfo's ``lock:`` lines)."""
    held: set[int] = set()
    for line in lines:
        parts = line.split()
        if key not in parts:
            continue
        i = parts.index(key)
        start, end = int(parts[i + 1]), parts[i + 2]
        stop = 299 if end == "EOF" else min(int(end), 299)
        held.update(range(max(start, 100), stop + 1))
    return held


def lock_bytes(path: Path, pid: int | None = None) -> set[int]:
    """QEMU's lock bytes held on ``path``: by process ``pid`` (its fds' locks), or by
    anyone (``/proc/locks``)."""
    key = _inode_key(path)
    if pid is None:
        with open("/proc/locks") as f:
            return _lock_ranges(f.read().splitlines(), key)
    held: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
                held |= _lock_ranges([ln for ln in f.read().splitlines()
                                      if ln.startswith("lock:")], key)
    return held


def writers(path: Path, pids: list[int]) -> list[int]:
    """Which of ``pids`` hold QEMU's write permission on ``path`` (an active writer)."""
    return [p for p in pids if WRITE_HELD in lock_bytes(path, p)]


def check_disks(paths: list[str], *, in_place: bool, taken: dict[str, tuple[str, bool]],
                beam: bool = False) -> list[tuple[Path, str, bool]]:
    """Check a new guest's disk files: (absolute path, format, O_DIRECT) for each; raises
    BadInputError for a missing file, an unknown format, a file given twice, or one in use
    (``taken``: user file -> (guest of this store that has it, written in place); or a
    QEMU's image lock on it)."""
    if len(paths) > MAX_DISKS:
        raise BadInputError(f"at most {MAX_DISKS} disks per guest")
    out: list[tuple[Path, str, bool]] = []
    seen: set[str] = set()
    for raw in paths:
        if not isinstance(raw, str) or not raw:
            raise BadInputError(f"invalid disk path {shown(raw)}")
        path = Path(raw).resolve()
        if not path.is_file():
            raise BadInputError(f"disk {shown(raw)} is not a file")
        if not os.access(path, os.R_OK | (os.W_OK if in_place else 0)):
            raise BadInputError(f"disk {path} is not {'writable' if in_place else 'readable'}")
        if str(path) in seen:
            raise BadInputError(f"disk {path} is given twice")
        seen.add(str(path))
        fmt = image_format(path)
        if fmt not in FORMATS:
            raise BadInputError(f"disk {path} is {shown(fmt)}: use qcow2 or raw")
        if beam and in_place and fmt == "qcow2":
            # It would have to grow past the block device it is plugged as (make_room);
            # an overlay gets that room, the user's file is not resized behind their back.
            raise BadInputError(f"disk {path} is qcow2: in a cloud VM a disk written in "
                                f"place must be raw (use an overlay: leave out "
                                f"--disk-in-place)")
        other = taken.get(str(path))
        if other is not None and (in_place or other[1]):
            raise BadInputError(f"disk {path} is in use by guest {other[0]!r}")
        locks = lock_bytes(path)
        if WRITE_HELD in locks or (in_place and WRITE_DENIED in locks):
            raise BadInputError(f"disk {path} is in use by another process (it holds QEMU's "
                                f"image lock)")
        out.append((path, fmt, supports_direct(path)))
    return out


def check_copy(guest: str, disks: tuple[Disk, ...]) -> None:
    """Refuse a copying move (precopy) of a guest that writes a disk in place: the copy
    would leave the user's file behind, stale."""
    for d in disks:
        if d.mode == DiskMode.IN_PLACE:
            raise BadInputError(f"guest {guest!r} writes {d.user_file} in place: it moves "
                                f"only by sharing the file (zero-copy or cpr-transfer), not "
                                f"by precopy")


def create_overlay(overlay: Path, backing: Path, backing_format: str) -> None:
    """A qcow2 overlay whose read-only backing is the user's file (``qemu-img create``)."""
    with contextlib.suppress(FileNotFoundError):
        overlay.unlink()
    out = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing),
                          "-F", backing_format, str(overlay)],
                         capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise DiskError(f"cannot create overlay {overlay}: {out.stderr.strip()}")


def make_room(image: Path) -> None:
    """Extend a qcow2 file (sparse) to the size it can ever need: a beam disk is a block
    device of fixed size in the cloud VM, so a qcow2 driver in the L2 cannot grow the file
    past its length at plug time (docs/design.md §11). ``qemu-img measure`` says how large a
    fully allocated image of this virtual size is."""
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)],
                          capture_output=True, text=True, timeout=30, check=False)
    if info.returncode != 0:
        raise DiskError(f"cannot inspect {image}: {info.stderr.strip()}")
    size = int(json.loads(info.stdout)["virtual-size"])
    out = subprocess.run(["qemu-img", "measure", "--output=json", "-O", "qcow2", "--size",
                          str(size)], capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise DiskError(f"cannot measure {image}: {out.stderr.strip()}")
    need = int(json.loads(out.stdout)["fully-allocated"]) + (1 << 20)
    if image.stat().st_size < need:
        os.truncate(image, need)


def new_disks(guest_dir: Path, checked: list[tuple[Path, str, bool]], *,
              in_place: bool, beam: bool = False) -> tuple[Disk, ...]:
    """The disks of a new guest, creating its overlays (``in_place``: none); ``beam``: for a
    guest in a cloud VM (each overlay given room to grow, :func:`make_room`)."""
    disks = []
    for i, (path, fmt, direct) in enumerate(checked):
        if in_place:
            disks.append(Disk(i, str(path), str(path), fmt, DiskMode.IN_PLACE.value, direct))
            continue
        overlay = guest_dir / f"disk{i}.qcow2"
        create_overlay(overlay, path, fmt)
        if beam:
            make_room(overlay)
        disks.append(Disk(i, str(overlay), str(path), fmt, DiskMode.OVERLAY.value,
                          direct and supports_direct(overlay)))
    return tuple(disks)
