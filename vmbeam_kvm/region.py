"""Beam regions: the host memory (a memfd) that holds exactly one guest's RAM.

A region is created and owned by vmbeam-kvm and handed to QEMU by file descriptor, so nothing
is left in ``/dev/shm``; it lives as long as any holder (us or a QEMU) keeps it open. The memfd
is at least one page longer than the guest RAM: its last page carries the region's *identity*
(magic, UUID, RAM size, guest name). Regions meant for cloud VMs are rounded up to a power of
two, because they are exposed there as a PCI BAR. Before a switch, the identity is read back
through the destination's own mapping, so a destination that maps other memory is refused
(docs/design.md §4.4) instead of silently running on zeros.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
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


MADV_POPULATE_WRITE = 23  # <linux/mman.h>; the mmap module of 3.11 may lack it


def huge_page_info(meminfo: str = "/proc/meminfo") -> tuple[int, int]:
    """(free huge pages, huge page size in bytes) of this host."""
    free, size = 0, 0
    with open(meminfo) as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                free = int(line.split()[1])
            elif line.startswith("Hugepagesize:"):
                size = int(line.split()[1]) * 1024
    return free, size


def check_huge_pages(ram_size: int) -> int:
    """The huge page size, if ``ram_size`` fits it and enough huge pages are free (RAM plus
    one for the identity); else BadInputError saying how to reserve them."""
    free, page = huge_page_info()
    if page <= 0:
        raise BadInputError("this host has no huge pages (no Hugepagesize in /proc/meminfo)")
    if ram_size % page:
        raise BadInputError(f"huge-page guests need memory in whole {page >> 20} MiB pages, "
                            f"not {ram_size} bytes")
    need = ram_size // page + 1
    if free < need:
        raise BadInputError(
            f"a huge-page region for {ram_size >> 20} MiB of RAM needs {need} free huge "
            f"pages of {page >> 20} MiB, the host has {free}: reserve them first, e.g. "
            f"`sysctl vm.nr_hugepages={need + _reserved()}`")
    return page


def _reserved() -> int:
    with open("/proc/sys/vm/nr_hugepages") as f:
        return int(f.read())


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
    def create(cls, ram_size: int, guest: str, *, pow2: bool = False,
               huge: bool = False) -> BeamRegion:
        """Create a new region for ``guest`` with ``ram_size`` bytes of RAM.

        ``pow2`` rounds the memfd up to a power of two (a PCI BAR's size); the pages between
        the RAM and the identity page are never touched, so they cost no memory. ``huge``
        backs it with the host's reserved huge pages (``MFD_HUGETLB``): the identity then
        takes the last huge page, and BadInputError says so when too few are free.
        """
        if ram_size <= 0 or ram_size % PAGE_SIZE:
            raise BadInputError(f"memory size {ram_size} is not a positive multiple of "
                                f"the page size ({PAGE_SIZE})")
        page = check_huge_pages(ram_size) if huge else PAGE_SIZE
        if huge and pow2:
            raise BadInputError("huge-page regions are for guests on this host, not in "
                                "cloud VMs")
        total = ram_size + page
        if pow2:
            total = 1 << (total - 1).bit_length()
        rid = uuid.uuid4()
        header = _HEADER.pack(_MAGIC, rid.bytes, ram_size, guest.encode()[:64])
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | (os.MFD_HUGETLB if huge else 0)
        fd = os.memfd_create(f"vmbeam-{guest}", flags)
        try:
            os.ftruncate(fd, total)
            if huge:
                # hugetlbfs has no write(): the identity goes in through a mapping.
                with mmap.mmap(fd, page, offset=total - page) as m:
                    m[page - PAGE_SIZE:page - PAGE_SIZE + len(header)] = header
            else:
                os.pwrite(fd, header, total - PAGE_SIZE)
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
    def huge(self) -> bool:
        """Backed by huge pages (hugetlbfs reports its page size as the block size)."""
        return os.fstat(self.fd).st_blksize > PAGE_SIZE

    def populate_write_supported(self) -> bool:
        """Whether this kernel prefaults a shared mapping of the region with
        ``MADV_POPULATE_WRITE`` (Linux 5.14+), which never changes memory contents. QEMU's
        ``prealloc`` falls back to reading and writing back each page, which would race a
        source guest still running on the same memory; prefault is refused then."""
        size = os.fstat(self.fd).st_blksize
        try:
            with mmap.mmap(self.fd, size) as m:
                m.madvise(MADV_POPULATE_WRITE, 0, size)
        except OSError:
            return False
        return True

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
