"""The two routes a guest moves along, phase by phase: on this host, and between cloud VMs.

:class:`LocalRoute` — the destination is a new QEMU process on this host; zero-copy maps
the guest's beam region (its memfd, passed as an fd), precopy a fresh region, cpr-transfer
is QEMU's own live-update peer for memfd guests. :class:`CloudRoute` — the destination is an
L2 QEMU in another cloud VM of the same tenant; *share* hot-plugs the guest's region (or a
fresh one, for precopy) into that cloud VM, the destination's agent starts the incoming QEMU
on it, the stream crosses the L1-L1 network (TLS with a per-move key), and *relocate* takes
the region back from the source cloud VM. The engine (:mod:`.engine`) runs the phases.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import disks as disk_files
from ..agent.protocol import L2Started
from ..cloudvm import CloudVMRecord
from ..config import (
    EJECT_GRACE,
    NESTED_DOWNTIME_LIMIT_MS,
    SOURCE_QUIT_TIMEOUT,
    UNREACHABLE_PROBE_TIMEOUT,
    prefault_connect_timeout,
)
from ..errors import AgentError, LaunchError, QMPCommandError, RegionError, VmbeamError
from ..heartbeat import Heartbeat, read_status, wait_for_heartbeat
from ..pagemap import FrameComparison, compare_frames, find_memfd_inode
from ..placement.cloud import CloudOps
from ..placement.local import LocalPlacement
from ..qemu.features import Guarantees, guarantees
from ..qemu.machine import RAM_ID, MachineSpec, build_argv
from ..qemu.process import (
    QemuProcess,
    cpu_seconds,
    find_qemus,
    host_memory_bytes,
    kill_found,
    pidfile_for,
)
from ..region import BeamRegion, read_identity_of, references
from ..store import GuestRecord
from . import faults
from .engine import Party, Route
from .handover import DestWatch, dies_within
from .model import MigrationMode, MigrationOptions, MigrationResult
from .resources import BeamDiskResource, DiskResource, NbdServer, Resource


async def ram_fd_of(qmp: Any) -> int:
    """The fd number through which a QEMU maps guest RAM (``mem-path=/proc/self/fd/N``);
    ``qmp`` is its QMP execute (or a QemuProcess)."""
    execute = qmp.execute if isinstance(qmp, QemuProcess) else qmp
    path = await execute("qom-get", {"path": f"/objects/{RAM_ID}", "property": "mem-path"})
    tail = str(path).removeprefix("/proc/self/fd/")
    if tail == str(path) or not tail.isdigit():
        raise RegionError(f"QEMU maps guest RAM from {path!r}, not a beam region")
    return int(tail)


def _fill_frames(result: MigrationResult, f: FrameComparison | None) -> None:
    """The shared-frames figures of a comparison of the region in source and destination."""
    result.shared_frames_ratio = f.ratio if f else None
    result.frames = ({"pages": f.pages, "present_source": f.present_a,
                      "present_dest": f.present_b, "present_both": f.both,
                      "same_frame": f.same} if f else None)


class _Sampler:
    """Samples the host memory held by the QEMU processes involved, to report the peak."""

    def __init__(self, procs: list[QemuProcess]) -> None:
        self.procs = procs
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        self.peak = max(self.peak, host_memory_bytes([p.pid for p in self.procs if p.alive()]))

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            # Not `suppress(CancelledError): await task`: that would also swallow the
            # cancellation of the command itself (SIGINT/SIGTERM) and carry on with it.
            await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # retrieved: a failed sample only loses a figure


class LocalRoute(Route):
    """A move to a new QEMU process on this host."""

    where = "local"
    poll = 0.001

    def __init__(self, place: LocalPlacement, rec: GuestRecord, src: QemuProcess,
                 spec: MachineSpec, opts: MigrationOptions) -> None:
        super().__init__(rec, opts)
        self.place, self.src, self.spec = place, src, spec
        self.guest_timeout = opts.guest_timeout
        # cpr-transfer: the new QEMU's QMP opens only after the cpr handshake.
        self.probes_parties = opts.mode is not MigrationMode.CPR_TRANSFER
        self.dst: QemuProcess | None = None
        self.src_region: BeamRegion | None = None
        self.dst_region: BeamRegion | None = None
        self._dst_fd: int | None = None  # the destination's region fd, once verified
        self.inst = rec.instance + 1
        self.qmp_path, self.serial, self.qlog = place.instance_paths(rec.name, self.inst)
        gdir = place.store.guest_dir(rec.name)
        self.main_sock = gdir / f"mig-{self.inst}.sock"
        self.cpr_sock = gdir / f"cpr-{self.inst}.sock"
        self.sampler = _Sampler([src])
        self._cpu0 = 0.0
        self.cpu = 0.0
        self.frames: FrameComparison | None = None
        # The guest's disks take part through the phase hooks (.resources): shared by
        # zero-copy and cpr-transfer, copied (NBD + mirror) by precopy.
        self.nbd = NbdServer(self.dst_qmp, gdir / f"nbd-{self.inst}.sock")
        copied = opts.mode is MigrationMode.PRECOPY
        self.resources: list[Resource] = []
        self.disks: list[DiskResource] = []
        for disk in spec.disks:
            res = DiskResource(disk, copied=copied, src_qmp=self.src_qmp,
                               dst_qmp=self.dst_qmp, nbd=self.nbd,
                               dest_path=gdir / f"disk{disk.index}-{self.inst}.qcow2")
            self.disks.append(res)
            self.resources.append(res)
        self.pauses_at_switchover = any(r.copies for r in self.resources)

    @property
    def cpr(self) -> bool:
        return self.mode is MigrationMode.CPR_TRANSFER

    async def src_qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.src.execute(cmd, args)

    async def dst_qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        assert self.dst is not None
        return await self.dst.execute(cmd, args)

    def dest_watch(self) -> DestWatch | None:
        return self.dst

    @property
    def hook_target(self) -> Any:
        return self.dst

    def measure_start(self) -> None:
        self._cpu0 = cpu_seconds(self.src.pid)
        self.sampler.start()

    # ---- SHARE: the source's region, or a fresh one for precopy ---------------------------
    async def share(self) -> None:
        if self.cpr:
            await self._share_resources()
            return  # QEMU's own memfd travels over the cpr channel
        self.src_region = BeamRegion.open_from_process(
            self.src.pid, await ram_fd_of(self.src), self.rec.region_id)
        dest_region = faults.hooks().dest_region
        if dest_region is not None:
            self.dst_region = dest_region
        elif self.mode is MigrationMode.ZERO_COPY:
            self.dst_region = self.src_region
        else:
            self.dst_region = BeamRegion.create(self.rec.memory, self.rec.name,
                                                huge=self.src_region.huge)
        if self.opts.prefault and not self.dst_region.populate_write_supported():
            raise RegionError("this kernel cannot prefault the region without touching "
                              "its contents (no MADV_POPULATE_WRITE): move without "
                              "--prefault")
        await self._share_resources()

    async def _share_resources(self) -> None:
        for res in self.resources:
            await res.share()

    def meter_address(self) -> tuple[str, str | None] | None:
        return "127.0.0.1", None

    def _spec(self) -> MachineSpec:
        return dataclasses.replace(self.spec, ticks=self.src_ticks,
                                   disks=tuple(d.dest for d in self.disks))

    # ---- PREPARE: the destination QEMU, waiting for its stream ----------------------------
    async def launch(self) -> None:
        for s in (self.main_sock, self.cpr_sock):
            with contextlib.suppress(FileNotFoundError):
                s.unlink()
        # Under the guest's lock, a QEMU on this instance's pidfile is a destination an
        # earlier move launched and died (SIGKILL) before journaling: it would hold the
        # pidfile (QEMU refuses a locked one) and run for nothing.
        mine = pidfile_for(self.qmp_path)
        for ref, pidfile in find_qemus(mine.parent):
            if pidfile == mine and ref != self.src.ref:
                kill_found(ref, pidfile)
        if self.cpr:
            chan = {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix",
                                                    "path": str(self.cpr_sock)}}
            argv = build_argv(self._spec(), qmp_path=self.qmp_path, serial_path=self.serial,
                              incoming=[json.dumps(chan), "defer"], ticks_to=self.ticks_to)
            self.dst = await QemuProcess.launch(argv, self.qmp_path, self.qlog, connect=False)
        else:
            assert self.dst_region is not None
            argv = build_argv(self._spec(), qmp_path=self.qmp_path, serial_path=self.serial,
                              ram_fd=self.dst_region.fd, incoming=["defer"],
                              ticks_to=self.ticks_to, prealloc=self.opts.prefault)
            self.dst = await QemuProcess.launch(argv, self.qmp_path, self.qlog,
                                                pass_fds=[self.dst_region.fd], connect=False)
        self.place.rt.procs.adopt(self.dst)
        self.sampler.procs.append(self.dst)
        self.note(dst_pid=self.dst.pid, dst_start=self.dst.ref.start_time,
                  dst_qmp=str(self.qmp_path), dst_serial=str(self.serial),
                  dst_log=str(self.qlog), dst_instance=self.inst,
                  dst_disks=disk_files.dumps([d.dest for d in self.disks]))

    async def verify(self) -> None:
        assert self.dst is not None
        if self.cpr:
            await self._wait_cpr_socket()
            return
        # A prefaulting QEMU maps all of the region before it opens QMP.
        await self.dst.connect(prefault_connect_timeout(self.rec.memory)
                               if self.opts.prefault else 20.0)
        if self.mode is not MigrationMode.ZERO_COPY:
            return
        # Refuse unless the destination maps this very region, shared (docs/design.md §4.3, §4.4).
        assert self.src_region is not None
        dst_fd = await ram_fd_of(self.dst)
        self.src_region.verify(read_identity_of(self.dst.pid, dst_fd))
        self._dst_fd = dst_fd
        for proc in (self.src, self.dst):
            share = await proc.execute("qom-get", {"path": f"/objects/{RAM_ID}",
                                                   "property": "share"})
            if share is not True:
                raise RegionError(f"QEMU {proc.pid} maps guest RAM without share=on")

    async def _wait_cpr_socket(self) -> None:
        """cpr-transfer: the new QEMU listens on the cpr socket; its QMP opens afterwards."""
        assert self.dst is not None
        deadline = time.monotonic() + 20
        while not self.cpr_sock.exists():
            if not self.dst.alive():
                raise LaunchError(f"new QEMU exited: {self.dst.log_tail()}")
            if time.monotonic() > deadline:
                raise LaunchError("new QEMU did not open its cpr socket")
            await asyncio.sleep(0.005)

    async def configure(self, src: Party, dst: Party) -> None:
        if self.cpr:  # the destination's QMP opens only after the cpr handshake
            await self.src_qmp("migrate-set-parameters", {"mode": "cpr-transfer"})
            return
        await super().configure(src, dst)

    async def tune(self, src: Party, dst: Party) -> None:
        # Set every time (a QEMU keeps what its last migration was given).
        src.caps["pause-before-switchover"] = self.pauses_at_switchover

    async def listen(self) -> str:
        uri = f"unix:{self.main_sock}"
        for res in self.resources:
            await res.prepare()  # copied disks: mirrored until in step
        if not self.cpr:
            await self.dst_qmp("migrate-incoming", {"uri": uri})
        return uri

    async def at_switchover(self) -> None:
        for res in self.resources:
            await res.switch()
        await self.src_qmp("migrate-continue", {"state": "pre-switchover"})

    # ---- SWITCH ------------------------------------------------------------------------------
    async def switch(self, uri: str) -> None:
        if not self.cpr:
            await super().switch(uri)
            return
        assert self.dst is not None
        addr = {"transport": "socket", "type": "unix"}
        await self.src_qmp("migrate", {"channels": [
            {"channel-type": "main", "addr": {**addr, "path": str(self.main_sock)}},
            {"channel-type": "cpr", "addr": {**addr, "path": str(self.cpr_sock)}}]})
        await self.dst.connect()
        await self.dst.execute("migrate-incoming", {"uri": uri})

    # ---- CONFIRM -----------------------------------------------------------------------------
    async def dest_state(self) -> tuple[bool, str | None]:
        assert self.dst is not None
        if not self.dst.alive():
            return False, None
        with contextlib.suppress(VmbeamError):
            return True, await self.dst.run_state()
        return self.dst.alive(), None

    def dest_failed(self, alive: bool) -> str:
        assert self.dst is not None
        return (f"destination QEMU {'did not start' if alive else 'died'} after the switch "
                f"({self.dst.log_tail(2)})")

    def measure_confirmed(self) -> None:
        assert self.dst is not None
        self.cpu = cpu_seconds(self.src.pid) - self._cpu0 + cpu_seconds(self.dst.pid)

    # ---- RELOCATE: the destination runs the guest; the source quits ------------------------
    def commit(self) -> None:
        assert self.dst is not None
        rec = self.rec
        rec.pid, rec.pid_start = self.dst.pid, self.dst.ref.start_time
        rec.qmp_path, rec.serial_path = str(self.qmp_path), str(self.serial)
        rec.log_path, rec.instance = str(self.qlog), self.inst
        if self.dst_region is not None:
            rec.region_id = self.dst_region.region_id
        rec.qemu = self.spec.qemu
        rec.disks = disk_files.dumps([d.dest for d in self.disks])

    async def relocate(self) -> None:
        assert self.dst is not None
        if self.opts.compare_frames and self.mode is not MigrationMode.PRECOPY:
            self.frames = await asyncio.to_thread(self._compare, self.src.pid, self.dst.pid)
        self.sampler.sample()
        await self.sampler.stop()
        for res in self.resources:
            await res.confirm()
        await self.nbd.stop()
        await self.src.quit()
        self.place.rt.procs.forget(self.src)
        for res in self.resources:
            await res.relocate()

    def _compare(self, pid_a: int, pid_b: int) -> FrameComparison | None:
        try:
            inode = (os.stat(f"/proc/{pid_b}/fd/{self._dst_fd}").st_ino
                     if self._dst_fd is not None else find_memfd_inode(pid_a, self.rec.memory))
            return compare_frames(pid_a, pid_b, inode, self.rec.memory)
        except (RegionError, OSError):
            return None

    async def heartbeat(self) -> Heartbeat | None:
        return read_status(Path(self.rec.serial_path)).heartbeat

    async def wait_heartbeat(self, after_seq: int, timeout: float) -> Heartbeat | None:
        return await wait_for_heartbeat(Path(self.rec.serial_path), after_seq=after_seq,
                                        timeout=timeout)

    def fill(self, result: MigrationResult) -> None:
        _fill_frames(result, self.frames)
        result.peak_qemu_memory_bytes = self.sampler.peak
        result.qemu_cpu_seconds = round(self.cpu, 3)
        result.disks = [r.report() for r in self.resources]
        result.disk_bytes_copied = sum(int(d["bytes_copied"]) for d in result.disks)

    # ---- rollback ----------------------------------------------------------------------------
    async def drop_dest(self) -> None:
        if self.dst is not None:
            self.dst.kill()
            self.place.rt.procs.forget(self.dst)
        for res in self.resources:
            await res.rollback()
        await self.nbd.stop()

    async def source_alive(self) -> tuple[bool, str]:
        if self.src.alive():
            try:
                await self.src.execute("query-status")
            except VmbeamError:
                # A killed QEMU's sockets close a moment before it is seen gone (more so
                # on a loaded host): give it that moment before calling it alive.
                await dies_within(self.src, 2.0)
        return self.src.alive(), f"its QEMU, pid {self.src.pid}: {self.src.log_tail(2)}"

    async def cleanup(self) -> None:
        await self.sampler.stop()
        keep = faults.hooks().dest_region
        for region in {id(r): r for r in (self.src_region, self.dst_region)
                       if r is not None}.values():
            if region is not keep:
                region.close()


class CloudRoute(Route):
    """A move of a guest in one cloud VM to another cloud VM of the same tenant."""

    where = "cloud-vm"
    poll = 0.005  # every QMP call is an agent round trip inside the L1s
    guest_timeout = 60.0

    def __init__(self, ops: CloudOps, rec: GuestRecord, src_vm: CloudVMRecord,
                 dst_vm: CloudVMRecord, opts: MigrationOptions) -> None:
        super().__init__(rec, opts)
        self.ops, self.src_vm, self.dst_vm = ops, src_vm, dst_vm
        self.src_agent, self.dst_agent = ops.agent(src_vm), ops.agent(dst_vm)
        self.src_l1, self.dst_l1 = ops.l1(src_vm), ops.l1(dst_vm)
        self.sampler = _Sampler([self.src_l1, self.dst_l1])
        self.tls = ops.rt.settings.migration_tls.applies(self.mode is MigrationMode.ZERO_COPY)
        self.dst_region_id = ""
        self.src_region_id = rec.region_id
        self.started: L2Started | None = None
        self.dst_pid = 0
        self.detached = False
        self.ejected = False
        self.can_revoke = False
        self.frames: FrameComparison | None = None
        self.revoked_ms: float | None = None
        self._cpu0 = 0.0
        self._net0 = 0
        self.cpu = 0.0
        self.net = 0
        # The guest's disks: the same files plugged into the destination (zero-copy only:
        # migrate_between refuses precopy of a guest with disks).
        self.disks = disk_files.loads(rec.disks)
        self.resources: list[Resource] = [self._beam_disk(d) for d in self.disks]
        self.disk_revoked_ms: float | None = None

    def _beam_disk(self, disk: disk_files.Disk) -> BeamDiskResource:
        ops, name, src, dst = self.ops, self.rec.name, self.src_vm.name, self.dst_vm.name
        return BeamDiskResource(
            disk, plug_dst=lambda: ops.attach_disks(ops.vm(dst), name, (disk,)),
            unplug_src=lambda: ops.release_disks(ops.vm(src), name, disk),
            unplug_dst=lambda: ops.release_disks(ops.vm(dst), name, disk))

    async def src_qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        with self._from_source():
            return await self.src_agent.qmp(self.rec.name, cmd, args)

    async def dst_qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.dst_agent.qmp(self.rec.name, cmd, args)

    @contextlib.contextmanager
    def _from_source(self) -> Iterator[None]:
        """Note a source end that gives no answer (an agent that did not reply, an L1
        QEMU whose QMP times out); an error it answered with is an answer."""
        try:
            yield
        except AgentError as exc:
            if not exc.remote_type:
                self.source_unanswered = True
            raise
        except QMPCommandError as exc:
            if not exc.error_class:
                self.source_unanswered = True
            raise

    def pending_text(self) -> str:
        return f"cloud VM {self.src_vm.name} does not answer"

    @property
    def hook_target(self) -> Any:
        return self.dst_agent

    async def open(self) -> None:
        # Both agent channels for the whole move, taken in one global order so that two
        # commands moving guests in opposite directions cannot each hold one and wait.
        for agent in sorted((self.src_agent, self.dst_agent), key=lambda a: a.name):
            await agent.connect()

    def measure_start(self) -> None:
        self._cpu0 = sum(cpu_seconds(p.pid) for p in (self.src_l1, self.dst_l1))
        self.sampler.start()  # both cloud VMs' QEMUs: their memory, the region once

    async def _net_bytes(self) -> int:
        """rx+tx bytes of the destination cloud VM's tap (its whole L1-L1 traffic)."""
        if not self.dst_vm.lab or not self.dst_vm.tap:
            return 0
        return await self.ops.lab(self.dst_vm).link_bytes(self.dst_vm.tap)

    # ---- SHARE: the guest's region (or a fresh one) hot-plugged into the destination ------
    async def share(self) -> None:
        self.note(src_cloud_vm=self.src_vm.name, dst_cloud_vm=self.dst_vm.name,
                  src_region=self.rec.region_id)
        self._net0 = await self._net_bytes()
        if self.mode is MigrationMode.ZERO_COPY:
            region = await self._reopen_region()
        else:
            region = BeamRegion.create(self.rec.memory, self.rec.name, pow2=True)
        with region:
            # Journaled before the hot-plug, so that recovery knows what to take back.
            self.dst_region_id = region.region_id
            self.note(dst_region=region.region_id)
            if self.mode is not MigrationMode.ZERO_COPY:
                self.ops.store.add_region(region.region_id, self.rec.name, self.rec.tenant,
                                          self.rec.memory, region.size)
            await self.ops.attach(self.dst_vm, region)
        for res in self.resources:
            await res.share()

    async def _reopen_region(self) -> BeamRegion:
        """Our own handle on the guest's region, taken from the source cloud VM's QEMU."""
        att = self.src_vm.attachments.get(self.rec.region_id)
        if att is None:
            raise RegionError(f"region {self.rec.region_id} is not attached to "
                              f"{self.src_vm.name}")
        with self._from_source():
            fdsets = await self.src_l1.execute("query-fdsets")
        for fdset in fdsets:
            if fdset["fdset-id"] == att["fdset"]:
                return BeamRegion.open_from_process(self.src_l1.pid, fdset["fds"][0]["fd"],
                                                    self.rec.region_id)
        raise RegionError(f"fdset {att['fdset']} of region {self.rec.region_id} is gone")

    # ---- PREPARE: the destination agent checks the region and starts the incoming L2 -------
    async def launch(self) -> None:
        # The agent refuses a region that is not mapped there or holds another size; the
        # NIC (a tap on the destination's lab bridge) is plumbed before the switch.
        # A copy of this guest in the destination cloud VM is stale by definition (the
        # guest runs in the source): one left by a move whose source was hung goes first.
        await self.dst_agent.stop_guest(self.rec.name, kill=True)
        self.started = await self.dst_agent.start_guest(
            self.rec.name, memory=self.rec.memory, image=self.rec.image, touch=self.rec.touch,
            region_id=self.dst_region_id, incoming=True, ticks=self.src_ticks,
            cpus=self.rec.cpus, disks=[d.wire(self.rec.name) for d in self.disks],
            ticks_to=self.ticks_to, **self.ops.nic_args(self.rec))

    def meter_address(self) -> tuple[str, str | None] | None:
        # The L2s' ticks cross the lab network to L0's address on the bridge.
        if not self.src_vm.lab:
            return None
        lab = self.ops.lab(self.src_vm)
        return lab.gateway, lab.ns

    async def tune(self, src: Party, dst: Party) -> None:
        if self.mode is not MigrationMode.ZERO_COPY:
            # A TCG guest rewrites its pages faster than the L1-L1 virtio link carries
            # them: without throttling, precopy never converges.
            src.caps["auto-converge"] = True
            src.params["downtime-limit"] = NESTED_DOWNTIME_LIMIT_MS
        else:
            src.caps["auto-converge"] = False
        creds = await self._migration_tls()
        src.params["tls-creds"] = dst.params["tls-creds"] = creds

    async def _migration_tls(self) -> str:
        """A fresh pre-shared key for both ends (or "" = TLS off); returns the creds id."""
        if not self.tls:
            return ""
        key = secrets.token_hex(32)
        with self._from_source():
            await self.src_agent.migration_tls(self.rec.name, "client", key)
        return await self.dst_agent.migration_tls(self.rec.name, "server", key)

    async def listen(self) -> str:
        # Port 0: the kernel picks a free one, so that moves into one cloud VM can overlap.
        await self.dst_qmp("migrate-incoming", {"uri": "tcp:0.0.0.0:0"})
        listening = await self.dst_qmp("query-migrate")
        port = int(listening["socket-address"][0]["port"])
        return f"tcp:{self.dst_vm.ip.split('/')[0]}:{port}"

    async def last_look(self) -> None:
        # The destination's agent and its incoming QEMU must both still be there.
        assert self.started is not None
        st = await self.dst_agent.status(self.rec.name, timeout=10)
        if st.agent_pid != self.started.agent_pid:
            raise AgentError("the destination agent restarted during prepare")
        if st.run_state != "inmigrate":
            raise AgentError(f"destination QEMU is {st.run_state}")

    # ---- CONFIRM -----------------------------------------------------------------------------
    async def dest_state(self) -> tuple[bool, str | None]:
        try:
            st = await self.dst_agent.status(self.rec.name)
        except VmbeamError:
            return True, None  # not known yet: ask again until the deadline
        self.dst_pid = st.pid
        return st.alive, st.run_state

    def dest_failed(self, alive: bool) -> str:
        return (f"destination in {self.dst_vm.name} "
                f"{'did not run' if alive else 'died'} after the switch")

    def measure_confirmed(self) -> None:
        self.cpu = sum(cpu_seconds(p.pid) for p in (self.src_l1, self.dst_l1)) - self._cpu0

    # ---- RELOCATE: the source L2 quits; its cloud VM lets go of the region ------------------
    def commit(self) -> None:
        self.rec.cloud_vm, self.rec.pid = self.dst_vm.name, self.dst_pid
        self.rec.region_id = self.dst_region_id

    async def relocate(self) -> None:
        self.net = await self._net_bytes() - self._net0
        self.sampler.sample()
        await self.sampler.stop()
        src_vm = self.ops.vm(self.src_vm.name)
        inode = await self.ops.region_inode(src_vm, self.src_region_id)
        if (inode is not None and self.opts.compare_frames
                and self.mode is MigrationMode.ZERO_COPY):
            # L0's pagemap: the region's pages as both cloud VMs' QEMUs map them, before the
            # source lets go: the same physical frames, not copies.
            self.frames = await asyncio.to_thread(self._compare, inode)
        self.can_revoke = (await guarantees(self.src_l1.execute)).revoke
        if self.can_revoke:
            # The source cloud VM loses the guest's memory now, whatever its kernel does
            # (hung, paused, hostile); only then is it asked to quit its L2 (short deadline)
            # and to eject the device (not waited on).
            await self.ops.revoke(src_vm, self.src_region_id)
            self.revoked_ms = round((time.monotonic() - self.switched_at) * 1000, 3)
            await self._revoke_disks()
            try:
                await self.src_agent.stop_guest(self.rec.name, timeout=SOURCE_QUIT_TIMEOUT)
            except AgentError:
                # Hung: its copy (paused, on revoked memory) is stopped once it answers.
                await self.ops.note_stale(src_vm, self.src_region_id, self.rec.name)
        else:
            # Stock QEMU: relocation needs the source cloud VM to quit its L2 and eject.
            await self.src_agent.stop_guest(self.rec.name)
            await self.ops.release(src_vm, self.src_region_id)
            await self._revoke_disks()
        if self.src_region_id != self.dst_region_id:
            self.ops.store.remove_region(self.src_region_id)
        # L0's own view: the source cloud VM's QEMU maps nothing of the region, holds no fd.
        self.detached = inode is None or not await asyncio.to_thread(
            references, self.src_l1.pid, inode)

    async def _revoke_disks(self) -> None:
        """The source cloud VM loses the guest's disks on L0 (stock QEMU does this: a SCSI
        disk is unplugged without the cloud VM's help)."""
        for res in self.resources:
            await res.relocate()
        if self.resources:
            self.disk_revoked_ms = round((time.monotonic() - self.switched_at) * 1000, 3)

    def _compare(self, inode: int) -> FrameComparison | None:
        try:
            return compare_frames(self.src_l1.pid, self.dst_l1.pid, inode, self.rec.memory)
        except (RegionError, OSError):
            return None

    async def settle(self) -> None:
        if self.can_revoke:
            self.ejected = await self.ops.settle(self.ops.vm(self.src_vm.name),
                                                 self.src_region_id, EJECT_GRACE)
        else:
            self.ejected = True  # release waited for the eject

    async def cleanup(self) -> None:
        await self.sampler.stop()

    async def heartbeat(self) -> Heartbeat | None:
        if self.rec.cloud_vm == self.src_vm.name:
            with self._from_source():
                return await self.ops.heartbeat(self.rec)
        return await self.ops.heartbeat(self.rec)

    async def wait_heartbeat(self, after_seq: int, timeout: float) -> Heartbeat | None:
        return await self.ops.wait_heartbeat(self.rec, after_seq, timeout=timeout)

    def fill(self, result: MigrationResult) -> None:
        result.source_cloud_vm, result.dest_cloud_vm = self.src_vm.name, self.dst_vm.name
        result.source_detached, result.network_bytes = self.detached, self.net
        result.l0_cpu_seconds = result.qemu_cpu_seconds = round(self.cpu, 3)
        result.tls = self.tls
        _fill_frames(result, self.frames)
        result.source_ejected = self.ejected
        result.source_revoked_ms = self.revoked_ms
        result.peak_qemu_memory_bytes = self.sampler.peak
        result.disks = [r.report() for r in self.resources]
        result.disk_bytes_copied = sum(int(d["bytes_copied"]) for d in result.disks)
        result.source_disks_revoked_ms = self.disk_revoked_ms
        if not self.can_revoke:
            result.guarantees_missing = sorted(
                {*result.guarantees_missing, Guarantees(False, True).missing()[0]})

    # ---- rollback ----------------------------------------------------------------------------
    async def drop_dest(self) -> None:
        name = self.rec.name
        dst_alive = self.dst_l1.alive()
        if self.started is not None and dst_alive:
            with contextlib.suppress(VmbeamError):
                # The agent may be restarting: wait for it rather than leave the incoming
                # QEMU behind.
                await self.dst_agent.wait_ready(30)
                await self.dst_agent.stop_guest(name, kill=True)
        if self.dst_region_id:
            with contextlib.suppress(VmbeamError):
                await self.ops.release(self.dst_vm, self.dst_region_id)
            if self.dst_region_id != self.rec.region_id:
                self.ops.store.remove_region(self.dst_region_id)
        for res in self.resources:
            with contextlib.suppress(VmbeamError):  # a dead cloud VM's: only the records
                await res.rollback()

    async def source_alive(self) -> tuple[bool | None, str]:
        # A source that gave no answer during this move gets one short look more (it may
        # have been continued meanwhile); otherwise it may be restarting its agent.
        quick = self.source_unanswered
        try:
            src = await self.ops.l2_status(
                self.src_vm.name, self.rec.name, wait=0 if quick else 10,
                timeout=UNREACHABLE_PROBE_TIMEOUT if quick else None)
        except AgentError as exc:
            self.source_unanswered = True
            return None, f"in {self.src_vm.name}: {exc}"
        where = "its cloud VM died" if not self.src_l1.alive() else "its L2 QEMU is gone"
        return src.alive, f"in {self.src_vm.name}: {where}"

    def resumed_text(self) -> str:
        return f"guest still running in {self.src_vm.name}"


__all__ = ["CloudRoute", "LocalRoute", "ram_fd_of"]
