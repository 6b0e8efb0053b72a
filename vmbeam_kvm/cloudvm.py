"""Cloud VMs (L1): QEMU VMs on this host (L0) that run tenants' guests (L2) inside.

A cloud VM boots the image built by ``images/cloudvm`` with a read-only *source disk* that
carries this package and the guest images, so the agent always runs the current code without
rebuilding the image. Its agent channel is a virtio-serial port backed by a unix socket on L0
(no control port on any network); its NIC is a tap on the lab bridge. Beam regions are
hot-plugged as ``ivshmem-plain`` devices into PCIe root ports whose 64-bit windows sit above
4 GiB, so the L1 maps them write-back (docs/design.md §4.10). A guest's disks (*beam disks*:
L0's files) are hot-plugged as ``scsi-hd`` devices on the cloud VM's virtio-scsi controller,
found by the agent by their serial; a SCSI disk is unplugged by L0's QEMU at once, without
the cloud VM's help, which is what lets L0 revoke a source's access (docs/design.md §11).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import qemu.qmp

from .agent.protocol import PORT_NAME, AgentClient
from .config import CLOUD_VM_BOOT_TIMEOUT, REGION_EJECT_TIMEOUT, REPO_ROOT
from .errors import (
    AgentError,
    BadInputError,
    DiskError,
    LaunchError,
    QMPCommandError,
    RegionError,
)
from .qemu.features import REVOKE_COMMAND
from .qemu.machine import kvm_cpu
from .qemu.process import QemuProcess
from .region import BeamRegion, read_identity_of

if TYPE_CHECKING:  # pyroute2 is an L0-only dependency; the agent imports this package too
    from .net import LabNetwork

log = logging.getLogger(__name__)

ROOT_PORTS = 4            # hot-plug slots: at most this many regions per cloud VM
ROOT_PORT_WINDOW = "16G"  # prefetchable 64-bit window per port (largest region)
DISK_RELEASE_TIMEOUT = 10.0  # a SCSI disk's device and node gone from L0's QEMU
SCSI_BUS = "vscsi.0"      # the virtio-scsi controller's bus: beam disks, no root port each
# Seen here: 25-37 s for three cloud VMs booting at once on 2 busy cores (TCG).
BOOT_TIMEOUT = CLOUD_VM_BOOT_TIMEOUT


class CloudVMState(StrEnum):
    """Lifecycle of a cloud VM."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"
    LOST = "lost"


@dataclass
class CloudVMRecord:
    """One cloud VM as recorded in the state store."""

    name: str
    tenant: str
    memory: int
    cpus: int
    state: CloudVMState
    lab: str = ""
    ip: str = ""
    tap: str = ""
    pid: int = 0
    pid_start: int = 0
    qmp_path: str = ""
    agent_path: str = ""
    console_path: str = ""
    log_path: str = ""
    created_at: float = 0.0
    accel: str = ""  # the -accel it boots with ("" in stores from before it was recorded)
    # region id -> {"port": root port, "fdset": fdset id, "dev": device id, "obj": object id};
    # disk_key(serial) -> {"kind": "disk", "guest", "path", "node", "dev", "read_only"}
    attachments: dict[str, dict[str, Any]] = field(default_factory=dict)

    def regions(self) -> list[str]:
        """The regions attached (each holds a root port)."""
        return sorted(k for k, a in self.attachments.items() if not is_disk(a))

    def disks(self) -> dict[str, dict[str, Any]]:
        """The beam disks attached, by key."""
        return {k: a for k, a in self.attachments.items() if is_disk(a)}

    def free_slots(self) -> int:
        """Root ports free for regions (a guest needs one; disks need none)."""
        return ROOT_PORTS - len(self.regions())

    @property
    def agent(self) -> AgentClient:
        return AgentClient(Path(self.agent_path), self.name, Path(self.console_path))


def source_tree(dest: Path, images_dir: Path, l2_qemu: str | None = None) -> None:
    """Lay out what the cloud VM mounts at /opt/vmbeam: code, qemu.qmp, images, start-agent,
    and ``l2_qemu`` (L0's QEMU binary, when it is not the distribution's: the patched
    build) for the agent to run the L2s with; the cloud VM has the same libraries."""
    lib = dest / "lib"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    shutil.copytree(REPO_ROOT / "vmbeam_kvm", lib / "vmbeam_kvm", ignore=ignore)
    shutil.copytree(Path(qemu.qmp.__file__).parent, lib / "qemu" / "qmp", ignore=ignore)
    (lib / "qemu" / "__init__.py").touch()
    (dest / "images").mkdir()
    shutil.copy2(images_dir / "testguest.bin", dest / "images")
    if (images_dir / "linux" / "vmlinux").exists():
        shutil.copytree(images_dir / "linux", dest / "images" / "linux",
                        ignore=shutil.ignore_patterns("modules", "memload", "rootfs"))
    env = "export PYTHONPATH=/opt/vmbeam/lib VMBEAM_IMAGES_DIR=/opt/vmbeam/images\n"
    if l2_qemu and Path(l2_qemu).resolve().parent != Path("/usr/bin"):
        (dest / "qemu").mkdir()
        shutil.copy2(Path(l2_qemu).resolve(), dest / "qemu" / "qemu-system-x86_64")
        env += "export VMBEAM_AGENT_QEMU=/opt/vmbeam/qemu/qemu-system-x86_64\n"
    start = dest / "start-agent"
    start.write_text("#!/bin/sh\n# Started (and restarted) by the cloud VM's init.\n" + env
                     + "exec python3 -m vmbeam_kvm.agent.server\n")
    start.chmod(0o755)


def build_source_disk(state_dir: Path, images_dir: Path, l2_qemu: str | None = None) -> Path:
    """The source disk for cloud VMs, rebuilt only when its content changes."""
    work = state_dir / "srcdisk"
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    source_tree(tree, images_dir, l2_qemu)
    digest = hashlib.sha256()
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(tree)).encode())
            digest.update(path.read_bytes())
    disk = work / f"src-{digest.hexdigest()[:12]}.ext4"
    if not disk.exists():
        for old in work.glob("src-*.ext4"):
            old.unlink()
        subprocess.run([str(REPO_ROOT / "images" / "cloudvm" / "mksrc.sh"), str(disk),
                        str(tree)], check=True, capture_output=True)
    shutil.rmtree(tree)
    return disk


# One vCPU per cloud VM by default: three 2-vCPU cloud VMs put six TCG vCPU threads on a
# 2-core host, where L1 kernels lost their timer (docs/design.md §7.16); see TcgTuning.
CLOUD_VM_CPUS = 1


@dataclass(frozen=True)
class TcgTuning:
    """How a cloud VM runs under TCG: QEMU's TCG threading, the CPU model and extra kernel
    arguments. Parsed from ``Settings.cloudvm_tcg`` (``key=value;...``; empty = defaults).

    The default kernel arguments keep the L1's local APIC timer *periodic* (``nohz=off
    highres=off``). Tickless, an idle vCPU's only wake-up is one programmed one-shot
    deadline; under TCG on an oversubscribed host a CPU whose deadline is missed gets no
    timer interrupt again — the ``rcu_preempt kthread timer wakeup didn't happen …
    Possible timer handling issue on cpu=0`` stalls seen in the lab. A periodic APIC
    re-arms itself in QEMU whatever the guest does. Measured (three idle cloud VMs, L0 CPU):
    tickless 2 vCPUs 8.7 %, periodic 2 vCPUs 37 %, periodic 1 vCPU 21 % of one core.
    """

    thread: str = "multi"                  # -accel tcg,thread=
    cpu: str = ""                          # -cpu (empty: QEMU's default model)
    append: str = "nohz=off highres=off"   # extra kernel command line

    @classmethod
    def parse(cls, text: str) -> TcgTuning:
        values: dict[str, str] = {}
        for item in filter(None, text.split(";")):
            key, _, value = item.partition("=")
            if key not in ("thread", "cpu", "append"):
                raise BadInputError(f"cloud-VM TCG tuning: unknown key {key!r} "
                                    f"(thread, cpu, append)")
            values[key] = value
        return cls(**values)


def cloudvm_argv(rec: CloudVMRecord, *, qemu: str, accel: str, images_dir: Path,
                 src_disk: Path, mac: str, tcg: TcgTuning | None = None) -> list[str]:
    img = images_dir / "cloudvm"
    for f in (images_dir / "linux" / "vmlinux", img / "initrd.img", img / "rootfs.ext4"):
        if not f.exists():
            raise LaunchError(f"cloud-VM image {f} is missing: run `make images`")
    tcg = tcg or TcgTuning()
    append = f"console=ttyS0 quiet root=/dev/vda vmbeam.name={rec.name}"
    if rec.ip:
        append += f" vmbeam.ip={rec.ip}"
    if accel == "tcg" and tcg.append:
        append += f" {tcg.append}"
    accel_arg = f"tcg,thread={tcg.thread}" if accel == "tcg" else accel
    argv = [
        qemu, "-name", f"cloudvm-{rec.name},debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-accel", accel_arg, "-machine", "q35", "-m", f"{rec.memory}B", "-smp", str(rec.cpus),
        "-kernel", str(images_dir / "linux" / "vmlinux"), "-initrd", str(img / "initrd.img"),
        "-append", append,
        # snapshot=on: every cloud VM writes to its own throw-away overlay of the image.
        "-drive", f"file={img / 'rootfs.ext4'},if=virtio,format=raw,snapshot=on",
        "-drive", f"file={src_disk},if=virtio,format=raw,readonly=on",
        "-chardev", f"file,id=console,path={rec.console_path}", "-serial", "chardev:console",
        "-qmp", f"unix:{rec.qmp_path},server=on,wait=off",
        "-device", "virtio-serial-pci",
        # Beam disks are hot-plugged here (attach_disk): SCSI unplug needs no guest help.
        "-device", f"virtio-scsi-pci,id={SCSI_BUS.split('.')[0]}",
        "-chardev", f"socket,id=agent,path={rec.agent_path},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={PORT_NAME}",
        # Hot-plugged BARs land in the root ports' 64-bit windows, above 4 GiB: the L1
        # then maps regions write-back through /dev/mem.
        "-global", "q35-pcihost.pci-hole64-size=128G",
    ]
    if accel == "kvm":
        argv += ["-cpu", kvm_cpu(qemu)]
    elif tcg.cpu:
        argv += ["-cpu", tcg.cpu]
    for i in range(ROOT_PORTS):
        argv += ["-device", f"pcie-root-port,id=rp{i},chassis={i + 1},slot={i + 1},"
                            f"pref64-reserve={ROOT_PORT_WINDOW}"]
    if rec.tap:
        argv += ["-netdev", f"tap,id=net0,ifname={rec.tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=net0,mac={mac}"]
    return argv


def mac_for(name: str) -> str:
    h = hashlib.sha256(name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


async def launch_cloudvm(rec: CloudVMRecord, argv: list[str], lab: LabNetwork | None,
                         agent: AgentClient,
                         on_spawn: Callable[[QemuProcess], None] | None = None
                         ) -> QemuProcess:
    """Start the L1 QEMU (inside the lab's namespace, where its tap lives) and wait for
    its agent (on ``agent``: QEMU's chardev serves one client at a time). ``on_spawn`` is
    given each QEMU started, before its agent is waited on (to record it).

    A cloud VM whose agent does not answer by ``BOOT_TIMEOUT`` is restarted once (its
    console kept as ``console.log.1``); if it fails again the error names it and quotes the
    end of its console.
    """
    attempt = 1
    while True:
        proc = await QemuProcess.launch(argv, Path(rec.qmp_path), Path(rec.log_path),
                                        netns=lab.ns if lab else None, on_spawn=on_spawn)
        try:
            await agent.wait_ready(BOOT_TIMEOUT, alive=proc.alive)
            return proc
        except AgentError as exc:
            proc.kill()
            await agent.close()
            if attempt == 2:
                raise LaunchError(f"cloud VM {rec.name} did not come up, twice: {exc}; QEMU "
                                  f"log: {proc.log_tail(3)}") from exc
            log.warning("cloud VM %s did not come up (%s); restarting it once", rec.name,
                        str(exc).splitlines()[0])
            console = Path(rec.console_path)
            with contextlib.suppress(OSError):
                console.replace(console.with_name(console.name + ".1"))
            attempt += 1
        except BaseException:
            proc.kill()
            raise


async def attach_region(proc: QemuProcess, rec: CloudVMRecord, region: BeamRegion) -> None:
    """Hot-plug ``region`` into the cloud VM (add-fd + object-add + device_add)."""
    att = rec.attachments.get(region.region_id)
    if att is not None and att.get("revoked"):
        raise RegionError(f"cloud VM {rec.name} has not yet ejected its earlier device of "
                          f"region {region.region_id} (revoked; the eject is pending)")
    if att is not None:
        return
    used = {a["port"] for a in rec.attachments.values() if "port" in a}
    free = [f"rp{i}" for i in range(ROOT_PORTS) if f"rp{i}" not in used]
    if not free:
        raise RegionError(f"cloud VM {rec.name} has no free hot-plug slot")
    size = region.size
    if size & (size - 1):
        # QEMU aborts (taking the whole cloud VM down) on a non-power-of-two BAR.
        raise RegionError(f"region {region.region_id} is {size} bytes, not a power of two")
    short = region.region_id[:8]
    qmp = await proc.session()
    qmp.send_fd_scm(region.fd)
    fdset = await proc.execute("add-fd", {})
    att = {"port": free[0], "fdset": fdset["fdset-id"], "dev": f"iv-{short}",
           "obj": f"region-{short}"}
    try:
        # memory-backend-file opens mem-path with open(): QEMU's own fd via /proc works.
        await proc.execute("object-add", {
            "qom-type": "memory-backend-file", "id": att["obj"],
            "mem-path": f"/proc/self/fd/{fdset['fd']}", "size": size, "share": True})
        await proc.execute("device_add", {"driver": "ivshmem-plain", "memdev": att["obj"],
                                          "id": att["dev"], "bus": att["port"]})
    except QMPCommandError:
        with contextlib.suppress(QMPCommandError):
            await proc.execute("object-del", {"id": att["obj"]})
        with contextlib.suppress(QMPCommandError):
            await proc.execute("remove-fd", {"fdset-id": att["fdset"]})
        raise
    rec.attachments[region.region_id] = att


async def revoke_region(proc: QemuProcess, rec: CloudVMRecord, region_id: str) -> bool:
    """Take region ``region_id`` away from the cloud VM at once, without its help (patched
    QEMU's ``x-revoke-memory-backend``): its BAR reads as unassigned memory from now on,
    and L0's QEMU of it no longer maps the region or holds an fd of it. The eject is asked
    for but not waited on; the attachment stays recorded (``revoked``) until it is done.
    Returns False when the cloud VM does not hold the region."""
    att = rec.attachments.get(region_id)
    if att is None:
        return False
    if not att.get("revoked"):
        await proc.execute(REVOKE_COMMAND, {"id": att["obj"]})
        with contextlib.suppress(QMPCommandError):
            await proc.execute("remove-fd", {"fdset-id": att["fdset"]})
        rec.attachments[region_id] = att = {**att, "revoked": True}
    with contextlib.suppress(QMPCommandError):  # an eject asked for earlier is pending
        await proc.execute("device_del", {"id": att["dev"]})
    return True


async def device_gone(proc: QemuProcess, dev: str) -> bool:
    """Whether the cloud VM's QEMU no longer has device ``dev`` (its eject completed)."""
    peripherals = await proc.execute("qom-list", {"path": "/machine/peripheral"})
    return not any(p["name"] == dev for p in peripherals)


async def settle_revoked(proc: QemuProcess, rec: CloudVMRecord) -> None:
    """Finish what revocations left pending: where the cloud VM has ejected a revoked
    region's device, its backend object goes and so does the attachment record (the
    root port is free again)."""
    for region_id, att in list(rec.attachments.items()):
        if att.get("revoked") and await device_gone(proc, att["dev"]):
            with contextlib.suppress(QMPCommandError):
                await proc.execute("object-del", {"id": att["obj"]})
            rec.attachments.pop(region_id, None)


async def _unrecorded_attachment(proc: QemuProcess, region_id: str) -> dict[str, Any] | None:
    """An attachment of ``region_id`` the cloud VM's QEMU has but the store does not (a
    command died between hot-plugging it and recording it): found by the region's identity
    behind each fd L0 handed to that QEMU."""
    for fdset in await proc.execute("query-fdsets"):
        for fd in fdset["fds"]:
            with contextlib.suppress(OSError, RegionError):
                if read_identity_of(proc.pid, fd["fd"]).region_id == region_id:
                    short = region_id[:8]
                    return {"fdset": fdset["fdset-id"], "dev": f"iv-{short}",
                            "obj": f"region-{short}"}
    return None


async def detach_region(proc: QemuProcess, rec: CloudVMRecord, region_id: str,
                        timeout: float = REGION_EJECT_TIMEOUT) -> None:
    """Hot-unplug a region: device_del (the L1 ejects it), object-del, remove-fd."""
    att = rec.attachments.get(region_id)
    if att is None and proc.alive():
        att = await _unrecorded_attachment(proc, region_id)
    if att is None:
        return
    if att.get("revoked"):
        # Its memory is already gone from the cloud VM: ask for the eject again, do not
        # wait on a cloud VM that may never answer; settle_revoked finishes it later.
        with contextlib.suppress(QMPCommandError):
            await proc.execute("device_del", {"id": att["dev"]})
        await settle_revoked(proc, rec)
        return
    qmp = await proc.session()
    with qmp.listener("DEVICE_DELETED") as listener:
        try:
            await proc.execute("device_del", {"id": att["dev"]})
        except QMPCommandError as exc:
            if exc.error_class != "DeviceNotFound":
                raise
        else:
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RegionError(f"cloud VM {rec.name} did not eject region "
                                      f"{region_id} within {timeout:.0f} s")
                try:
                    event = await asyncio.wait_for(listener.get(), remaining)
                except TimeoutError:
                    continue
                data: Any = event["data"]
                if data.get("device") == att["dev"]:
                    break
    with contextlib.suppress(QMPCommandError):
        await proc.execute("object-del", {"id": att["obj"]})
    with contextlib.suppress(QMPCommandError):
        await proc.execute("remove-fd", {"fdset-id": att["fdset"]})
    rec.attachments.pop(region_id, None)


# -- beam disks ----------------------------------------------------------------------------
def is_disk(att: dict[str, Any]) -> bool:
    return att.get("kind") == "disk"


def disk_key(serial: str) -> str:
    """The attachment key of the disk device with ``serial``."""
    return f"disk:{serial}"


async def attach_disk(proc: QemuProcess, rec: CloudVMRecord, *, guest: str, serial: str,
                      path: str, read_only: bool, direct: bool) -> None:
    """Hot-plug L0's file ``path`` into the cloud VM as a SCSI disk with ``serial``.

    L0 opens it as a plain ``file`` node (the L2 QEMU runs the format driver itself) with
    image locking on. A writable disk is plugged ``share-rw``: during a move the source's
    and the destination's cloud VMs both hold it (README "Beam disks": the L2s hand it
    over with QEMU's inactivation, L0 revokes the source's device at relocate); a
    read-only one (an overlay's backing) lets no one else write the file."""
    key = disk_key(serial)
    if key in rec.attachments:
        return
    att = {"kind": "disk", "guest": guest, "path": path, "node": f"bd-{serial}",
           "dev": f"sd-{serial}", "read_only": read_only}
    await proc.execute("blockdev-add", {
        "driver": "file", "node-name": att["node"], "filename": path, "read-only": read_only,
        "locking": "on", "cache": {"direct": direct, "no-flush": False}})
    try:
        await proc.execute("device_add", {
            "driver": "scsi-hd", "drive": att["node"], "id": att["dev"], "serial": serial,
            "bus": SCSI_BUS, "share-rw": not read_only})
    except QMPCommandError:
        with contextlib.suppress(QMPCommandError):
            await proc.execute("blockdev-del", {"node-name": att["node"]})
        raise
    rec.attachments[key] = att


async def detach_disk(proc: QemuProcess, rec: CloudVMRecord, key: str) -> None:
    """Take a disk away from the cloud VM at once: its SCSI device goes from L0's QEMU
    whatever the cloud VM's kernel does (hung, paused, hostile), then the file node, so
    that L0's QEMU of the cloud VM holds no fd of the file and no image lock."""
    att = rec.attachments.get(key)
    if att is None:
        return
    if proc.alive():
        try:
            await proc.execute("device_del", {"id": att["dev"]})
        except QMPCommandError as exc:
            if exc.error_class != "DeviceNotFound":
                raise
        # The device leaves the tree at once, its BlockBackend a moment later (the device
        # is finalised after its last reference, requests in flight drained): the node
        # can be deleted only then, and that is the proof that the device let go.
        deadline = time.monotonic() + DISK_RELEASE_TIMEOUT
        while True:
            try:
                await proc.execute("blockdev-del", {"node-name": att["node"]})
                break
            except QMPCommandError as exc:
                nodes = await proc.execute("query-named-block-nodes", {"flat": True})
                if not any(n.get("node-name") == att["node"] for n in nodes):
                    break  # gone already (an earlier detach got this far)
                if time.monotonic() > deadline:
                    raise DiskError(f"cloud VM {rec.name} keeps disk node {att['node']}: "
                                    f"{exc}") from exc
                await asyncio.sleep(0.005)
    rec.attachments.pop(key, None)
