"""The QEMU command line of a guest: machine, RAM backend, boot image, control sockets.

Source and destination of a migration must agree on everything that shapes the migration
stream (machine type, RAM backend id and size, ROMs loaded by ``-kernel``), so both are built
from the same :class:`MachineSpec` and differ only in fds, sockets and ``-incoming``.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ..disks import Disk
from ..errors import BadInputError
from ..ticks import CHARDEV_ID as TICKS_CHARDEV
from ..ticks import chardev_arg
from ..units import shown

RAM_ID = "ram0"


class GuestImage(StrEnum):
    """Boot images built by ``images/``."""

    TEST = "test"    # freestanding heartbeat/pattern guest (images/testguest)
    LINUX = "linux"  # Debian cloud kernel (PVH vmlinux) + busybox initramfs (images/linux)
    DISK = "disk"    # whatever the first disk boots through firmware (SeaBIOS)

    @classmethod
    def resolve(cls, image: str | None, has_disks: bool) -> GuestImage:
        """The image of a new guest: as given, else its first disk when it has disks (the
        user's image boots), else the test guest. Raises BadInputError."""
        if image is None:
            return cls.DISK if has_disks else cls.TEST
        try:
            img = cls(image)
        except ValueError:
            raise BadInputError(f"unknown image {shown(image)}: use test, linux or disk"
                                ) from None
        if img is cls.DISK and not has_disks:
            raise BadInputError("--image disk boots the guest's first disk: give --disk PATH")
        return img

    @property
    def heartbeats(self) -> bool:
        """Whether every guest of this image reports heartbeats (a disk's OS may not)."""
        return self is not GuestImage.DISK


class RamBackend(StrEnum):
    """Where guest RAM comes from."""

    REGION = "region"  # a beam region: a memfd passed by fd, or (in a cloud VM) its PCI BAR
    MEMFD = "memfd"    # QEMU's own memfd (memory-backend-memfd), for the cpr-transfer peer


@dataclass(frozen=True)
class MachineSpec:
    """Everything that defines a guest's virtual hardware."""

    name: str
    memory: int
    image: GuestImage
    touch: int
    accel: str
    qemu: str
    images_dir: Path
    backend: RamBackend = RamBackend.REGION
    nic: tuple[str, str] | None = None  # (tap name, MAC): a virtio NIC on that tap
    guest_ip: str = ""                  # address/prefix the Linux guest configures
    # COM2, the tick port (:mod:`vmbeam_kvm.ticks`); False only for a guest whose QEMU was
    # started without one (an earlier release), since both ends must have the same devices.
    ticks: bool = True
    cpus: int = 1  # vCPUs (-smp); both ends of a move must agree
    disks: tuple[Disk, ...] = ()  # virtio-blk disks (vmbeam_kvm.disks), in this order

    def boot_args(self) -> list[str]:
        if self.image is GuestImage.DISK:
            # SeaBIOS boots disk0 (bootindex=0 on its device, Disk.blockdev_args); nothing
            # else is loaded, so both ends' ROMs are QEMU's own. GuestImage.resolve made
            # sure there is a disk.
            return []
        if self.image is GuestImage.TEST:
            kernel = self.images_dir / "testguest.bin"
            files = [kernel]
            args = ["-kernel", str(kernel), "-append", f"touch={self.touch}"]
        else:
            kernel = self.images_dir / "linux" / "vmlinux"
            initrd = self.images_dir / "linux" / "initrd.img"
            files = [kernel, initrd]
            args = ["-kernel", str(kernel), "-initrd", str(initrd),
                    "-append", f"console=ttyS0 quiet cryptomgr.notests mitigations=off "
                             f"panic=-1 touch={self.touch}"
                             + (f" vmbeam.ip={self.guest_ip}" if self.guest_ip else "")
                             # its disk workload, on disks made for it (vmbeam_kvm.diskcheck)
                             + (" vmbeam.disks=1" if self.disks else "")]
        for f in files:
            if not f.is_file():
                raise BadInputError(f"guest image {f} is missing: run `make images`")
        return args


# Where /dev/kvm refuses the IA32_ARCH_CAPABILITIES value QEMU derives from the host (kvm_pvm
# on an AMD EPYC host: "failed to set MSR 0x10a", then an assertion aborts QEMU at its first
# vCPU reset), the guest gets the host CPU without that MSR (docs/design.md §11).
KVM_CPU_MODELS = ("host", "host,-arch-capabilities")


@functools.lru_cache(maxsize=8)
def kvm_cpu(qemu: str) -> str:
    """The ``-cpu`` for KVM guests of ``qemu``: the first of :data:`KVM_CPU_MODELS` under
    which it starts (paused, no guest code runs: ~50 ms), checked once per process."""
    for model in KVM_CPU_MODELS:
        try:
            out = subprocess.run(
                [qemu, "-accel", "kvm", "-cpu", model, "-machine", "q35", "-m", "16M",
                 "-nodefaults", "-no-user-config", "-display", "none", "-S", "-qmp", "stdio"],
                input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
                capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            break
        if out.returncode == 0:
            return model
        if "MSR 0x10a" not in out.stderr:
            break  # another failure: the guest's own start reports it
    return KVM_CPU_MODELS[0]


def build_argv(spec: MachineSpec, *, qmp_path: Path, serial_path: Path,
               ram_fd: int | None = None, ram_path: str | None = None, ram_offset: int = 0,
               incoming: list[str] | None = None,
               ticks_to: tuple[str, int] | None = None, prealloc: bool = False) -> list[str]:
    """QEMU argv for ``spec``.

    ``ticks_to`` points the tick port at a meter from the start (a destination measured
    while it takes over); without it the ticks go nowhere. ``prealloc`` maps (prefaults)
    all of a region before the guest runs (callers check MADV_POPULATE_WRITE first).

    A region is given either as ``ram_fd`` (the memfd's fd number inside QEMU) or as
    ``ram_path`` + ``ram_offset`` (inside a cloud VM: ``/dev/mem`` at the region's BAR).
    """
    machine = f"q35,memory-backend={RAM_ID}"
    if spec.backend is RamBackend.REGION:
        if ram_fd is not None:
            ram_path = f"/proc/self/fd/{ram_fd}"
        if ram_path is None:
            raise ValueError("a region-backed guest needs ram_fd or ram_path")
        # share=on is what makes x-ignore-shared skip the RAM (docs/design.md §4.3).
        ram = (f"memory-backend-file,id={RAM_ID},mem-path={ram_path},size={spec.memory},"
               f"share=on" + (f",offset={ram_offset}" if ram_offset else "")
               + (",prealloc=on" if prealloc else ""))
    else:
        ram = f"memory-backend-memfd,id={RAM_ID},size={spec.memory},share=on"
        machine += ",aux-ram-share=on"
    argv = [
        spec.qemu, "-name", f"guest={spec.name},debug-threads=on",
        # -no-reboot: a guest whose memory was destroyed must stop, not silently reboot
        # and restart its heartbeat sequence.
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-accel", spec.accel, "-machine", machine, "-m", f"{spec.memory}B",
        "-object", ram,
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-chardev", f"file,id=serial0,path={serial_path}", "-serial", "chardev:serial0",
    ]
    if spec.ticks:
        argv += ["-chardev", chardev_arg(ticks_to), "-serial", f"chardev:{TICKS_CHARDEV}"]
    if spec.cpus != 1:  # 1 is QEMU's default: older guests' argv stays as it was
        argv += ["-smp", str(spec.cpus)]
    if spec.accel == "kvm":
        argv += ["-cpu", kvm_cpu(spec.qemu)]
    if spec.nic is not None:
        tap, mac = spec.nic
        argv += ["-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=net0,mac={mac}"]
    for disk in spec.disks:
        argv += disk.blockdev_args(boot=spec.image is GuestImage.DISK and disk is spec.disks[0])
    argv += spec.boot_args()
    for inc in incoming or []:
        argv += ["-incoming", inc]
    return argv
