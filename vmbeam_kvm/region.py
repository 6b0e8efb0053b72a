"""Beam regions: the host memory (a memfd) that holds exactly one guest's RAM.

A region is created and owned by vmbeam-kvm and handed to QEMU by file descriptor, so nothing
is left in ``/dev/shm``; it lives as long as any holder (us or a QEMU) keeps it open. The memfd
is at least one page longer than the guest RAM: its last page carries the region's *identity*
(magic, UUID, RAM size, guest name). Regions meant for cloud VMs are rounded up to a power of
two, because they are exposed there as a PCI BAR. Before a switch, the identity is read back
through the destination's own mapping, so a destination that maps other memory is refused
(DESIGN §4.4) instead of silently running on zeros.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import uuid
from dataclasses import dataclass
from types import TracebackType

from .errors import BadInputError, RegionError, RegionMismatchError
from .units import PAGE_SIZE

_MAGIC = b"VMBEAMR1"
# magic, uuid, ram size, guest name
_HEADER = struct.Struct("<8s16sQ64s")


@dataclass(frozen=True)
class RegionIdentity:
    """What a region claims to be; compared across processes before a switch."""

    region_id: str
    ram_size: int
    guest: str
    inode: int


def parse_identity(page: bytes, total_size: int, inode: int = 0) -> RegionIdentity:
    """Decode an identity page read from the end of a region of ``total_size`` bytes."""
    magic, rid, ram_size, name = _HEADER.unpack(page[:_HEADER.size])
    if magic != _MAGIC or ram_size + PAGE_SIZE > total_size:
        raise RegionError("memory has no beam-region identity page")
    return RegionIdentity(str(uuid.UUID(bytes=rid)), ram_size,
                          name.rstrip(b"\0").decode(), inode)


def read_identity(fd: int) -> RegionIdentity:
    """Read the identity page of the region open at ``fd``."""
    st = os.fstat(fd)
    if st.st_size < PAGE_SIZE * 2:
        raise RegionError(f"file of {st.st_size} bytes is not a beam region")
    return parse_identity(os.pread(fd, _HEADER.size, st.st_size - PAGE_SIZE), st.st_size,
                          st.st_ino)


def references(pid: int, inode: int) -> bool:
    """Whether process ``pid`` maps the file of ``inode`` or holds an fd of it (L0's own
    view of a cloud VM's QEMU: its /proc/PID/maps and /proc/PID/fd)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and fields[4] == str(inode):
                    return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/fd/{fd}").st_ino == inode:
                    return True
    except FileNotFoundError:
        return False  # the process is gone: it references nothing
    return False


def read_identity_of(pid: int, fd: int) -> RegionIdentity:
    """Read the identity of the region that process ``pid`` holds as its fd ``fd``."""
    try:
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise RegionError(f"cannot open fd {fd} of process {pid}: {exc.strerror}") from exc
    try:
        return read_identity(own)
    finally:
        os.close(own)


class BeamRegion:
    """A memfd holding one guest's RAM plus its identity page.

    Use as a context manager (sync or async); closing drops *our* reference only — QEMU
    processes that were given the fd keep the memory alive.
    """

    def __init__(self, fd: int, identity: RegionIdentity) -> None:
        self._fd = fd
        self.identity = identity

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, ram_size: int, guest: str, *, pow2: bool = False) -> BeamRegion:
        """Create a new region for ``guest`` with ``ram_size`` bytes of RAM.

        ``pow2`` rounds the memfd up to a power of two (a PCI BAR's size); the pages between
        the RAM and the identity page are never touched, so they cost no memory.
        """
        if ram_size <= 0 or ram_size % PAGE_SIZE:
            raise BadInputError(f"memory size {ram_size} is not a positive multiple of "
                                f"the page size ({PAGE_SIZE})")
        total = ram_size + PAGE_SIZE
        if pow2:
            total = 1 << (total - 1).bit_length()
        rid = uuid.uuid4()
        fd = os.memfd_create(f"vmbeam-{guest}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, total)
            os.pwrite(fd, _HEADER.pack(_MAGIC, rid.bytes, ram_size, guest.encode()[:64]),
                      total - PAGE_SIZE)
            # The size is part of the identity: nobody may shrink (SIGBUS) or grow it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_SEAL)
            return cls(fd, RegionIdentity(str(rid), ram_size, guest, os.fstat(fd).st_ino))
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open_from_process(cls, pid: int, fd: int, expect_id: str | None = None) -> BeamRegion:
        """Reopen the region that process ``pid`` holds as fd ``fd`` (e.g. a running QEMU)."""
        try:
            own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise RegionError(f"cannot reopen region fd {fd} of process {pid}: "
                              f"{exc.strerror}") from exc
        try:
            ident = read_identity(own)
            if expect_id is not None and ident.region_id != expect_id:
                raise RegionMismatchError(f"process {pid} maps region {ident.region_id}, "
                                          f"expected {expect_id}")
            return cls(own, ident)
        except BaseException:
            os.close(own)
            raise

    # -- use ------------------------------------------------------------------------------
    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise RegionError("region handle is closed")
        return self._fd

    @property
    def region_id(self) -> str:
        return self.identity.region_id

    @property
    def ram_size(self) -> int:
        return self.identity.ram_size

    @property
    def size(self) -> int:
        """Size of the whole memfd (RAM, unused padding, identity page)."""
        return os.fstat(self.fd).st_size

    def verify(self, other: RegionIdentity) -> None:
        """Raise :class:`RegionMismatchError` unless ``other`` is this very region."""
        mine = self.identity
        if other.region_id != mine.region_id or other.inode != mine.inode:
            raise RegionMismatchError(
                f"destination maps region {other.region_id} (inode {other.inode}), not the "
                f"guest's region {mine.region_id} (inode {mine.inode}); switch refused")
        if other.ram_size != mine.ram_size:
            raise RegionMismatchError(f"region size {other.ram_size} != {mine.ram_size}")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BeamRegion:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> BeamRegion:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"BeamRegion({self.identity.guest!r}, id={self.region_id}, "
                f"size={self.ram_size})")
