"""The cloud-VM placement: cloud VMs (L1) on this host and the guests (L2) inside them.

This host plays L0. A cloud VM is a QEMU here whose agent (reached over a virtio-serial
channel) runs L2 QEMUs inside it. A guest in a cloud VM has its RAM in a beam region on L0,
hot-plugged into that cloud VM as an ivshmem device; every call to its QEMU goes through the
agent. Its disks are L0's files, hot-plugged into that cloud VM as SCSI disks (beam disks:
overlays in the guest's state dir on L0, as for guests on this host). :class:`CloudOps` owns
the cloud VMs' lifecycle, their hot-plug bookkeeping and the L2 guests' lifecycle; the
migration engine uses its steps for moves between cloud VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import disks as disk_files
from ..agent.protocol import GONE, AgentClient, L2Status
from ..checks import check_cpus, check_new_guest
from ..cloudvm import (
    CLOUD_VM_CPUS,
    CloudVMRecord,
    CloudVMState,
    TcgTuning,
    attach_disk,
    attach_region,
    build_source_disk,
    cloudvm_argv,
    detach_disk,
    detach_region,
    disk_key,
    launch_cloudvm,
    mac_for,
    revoke_region,
    settle_revoked,
)
from ..config import (
    LAB_CLOUD_VM_HOSTS,
    LAB_GUEST_HOSTS,
    SOURCE_QUIT_TIMEOUT,
    agent_call_timeout,
)
from ..errors import AgentError, BadInputError, NetworkError, QMPCommandError, VmbeamError
from ..heartbeat import Heartbeat
from ..qemu.machine import GuestImage
from ..qemu.process import ProcessRef, QemuProcess, kill_strays
from ..region import BeamRegion
from ..runtime import Runtime
from ..seed import seed_disk
from ..store import GuestRecord, GuestState
from ..units import check_name, parse_percent, parse_size
from . import GuestStatus

if TYPE_CHECKING:  # pyroute2 is an L0 dependency: the agent in a cloud VM has none
    from ..net import LabNetwork

log = logging.getLogger(__name__)


class CloudOps:
    """Cloud VMs and the guests inside them, for one open host (a :class:`Placement`)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.store = rt.store
        self._agents: dict[str, AgentClient] = {}
        self._setup_lock = asyncio.Lock()
        self._plug_locks: dict[str, asyncio.Lock] = {}

    async def close(self) -> None:
        """Let go of every agent channel (each serves one client at a time)."""
        for agent in self._agents.values():
            await agent.close()
        self._agents.clear()

    # -- cloud VMs ------------------------------------------------------------------------
    def vm(self, name: str) -> CloudVMRecord:
        return self.store.get_cloud_vm(name)

    def l1(self, rec: CloudVMRecord) -> QemuProcess:
        """The cloud VM's QEMU on this host (each QMP command within the agent's call
        limit: a stopped cloud VM answers neither)."""
        proc = self.rt.procs.attach(ProcessRef(rec.pid, rec.pid_start), Path(rec.qmp_path),
                                    Path(rec.log_path))
        proc.call_timeout = agent_call_timeout()
        return proc

    def agent(self, rec: CloudVMRecord) -> AgentClient:
        client = self._agents.get(rec.name)
        if client is None or str(client.path) != rec.agent_path:
            client = self._agents[rec.name] = rec.agent
        return client

    def lab(self, rec: CloudVMRecord) -> LabNetwork:
        """The lab network cloud VM ``rec`` is on."""
        from ..net import LabNetwork
        s = self.rt.settings
        return LabNetwork(rec.lab, s.lab_subnet, s.lab_owner)

    def reap(self) -> None:
        """Record cloud VMs whose QEMU died behind our back as lost, with their guests.

        The regions they had attached are gone from them (the kernel closed the dead QEMU's
        fds); the guests' region records stay until ``guest stop``.
        """
        for vm in self.store.cloud_vms():
            if vm.state is not CloudVMState.RUNNING or self.l1(vm).alive():
                continue
            log.warning("cloud VM %s (pid %d) is gone", vm.name, vm.pid)
            vm.state, vm.attachments = CloudVMState.LOST, {}
            self.store.update_cloud_vm(vm)
            self.store.log_event("lost", vm.name, f"cloud VM QEMU pid {vm.pid} died")
            for guest in self.store.guests():
                if guest.cloud_vm == vm.name and guest.state is GuestState.RUNNING:
                    guest.state = GuestState.LOST
                    self.store.update_guest(guest)

    @contextlib.asynccontextmanager
    async def plugging(self, vm: CloudVMRecord) -> AsyncIterator[CloudVMRecord]:
        """Hot-plug work on cloud VM ``vm``: one at a time in this process (other commands
        hold its agent channel meanwhile), on its current record; only the attachments
        that changed are written back, and ``vm`` is brought up to date."""
        async with self._plug_locks.setdefault(vm.name, asyncio.Lock()):
            cur = self.store.get_cloud_vm(vm.name)
            before = dict(cur.attachments)
            try:
                await self._settle(cur)
                yield cur
            finally:
                for rid in before.keys() | cur.attachments.keys():
                    if before.get(rid) != cur.attachments.get(rid):
                        self.store.record_attachment(vm.name, rid, cur.attachments.get(rid))
                vm.attachments = cur.attachments

    async def attach(self, vm: CloudVMRecord, region: BeamRegion) -> None:
        """Hot-plug ``region`` into cloud VM ``vm`` and record it."""
        async with self.plugging(vm) as cur:
            await attach_region(self.l1(cur), cur, region)

    async def attach_disks(self, vm: CloudVMRecord, guest: str,
                           disks: tuple[disk_files.Disk, ...]) -> None:
        """Hot-plug guest ``guest``'s disks into cloud VM ``vm`` (each file, and an
        overlay's backing read-only) and record them."""
        async with self.plugging(vm) as cur:
            l1 = self.l1(cur)
            for d in disks:
                top, base = d.beam_serials(guest)
                if base is not None:
                    await attach_disk(l1, cur, guest=guest, serial=base, path=d.user_file,
                                      read_only=True, direct=d.direct)
                await attach_disk(l1, cur, guest=guest, serial=top, path=d.path,
                                  read_only=False, direct=d.direct)

    async def release_disks(self, vm: CloudVMRecord, guest: str,
                            only: disk_files.Disk | None = None) -> None:
        """Take the disks of guest ``guest`` (``only`` that one) away from cloud VM ``vm`` at
        once (L0 unplugs the SCSI device and closes the file whatever the cloud VM does)
        and record it."""
        keys = ({disk_key(s) for s in only.beam_serials(guest) if s} if only is not None
                else None)
        async with self.plugging(vm) as cur:
            l1 = self.l1(cur)
            for key, att in cur.disks().items():
                if att.get("guest") != guest or (keys is not None and key not in keys):
                    continue
                if l1.alive():
                    await detach_disk(l1, cur, key)
                else:
                    cur.attachments.pop(key, None)

    async def release(self, vm: CloudVMRecord, region_id: str) -> None:
        """Hot-unplug ``region_id`` from ``vm`` (waiting for the eject) and record it; a
        dead cloud VM's QEMU holds nothing any more, so only the record changes."""
        async with self.plugging(vm) as cur:
            l1 = self.l1(cur)
            if l1.alive():
                await detach_region(l1, cur, region_id)
            else:
                cur.attachments.pop(region_id, None)

    async def revoke(self, vm: CloudVMRecord, region_id: str) -> bool:
        """Take ``region_id`` away from cloud VM ``vm`` at once, without its help (needs the
        patched QEMU: :func:`~vmbeam_kvm.cloudvm.revoke_region`); the eject stays pending."""
        async with self.plugging(vm) as cur:
            return await revoke_region(self.l1(cur), cur, region_id)

    async def _settle(self, cur: CloudVMRecord) -> None:
        """Finish what revocations left pending in cloud VM ``cur``: stop the L2 it could not
        quit when its memory was revoked (it was hung) — only while that copy still runs on
        the revoked region, never a copy that arrived since — then, once the cloud VM has
        ejected the device, drop its backend and the record (the root port is free again)."""
        pending = {r: a for r, a in cur.attachments.items() if a.get("revoked")}
        l1 = self.l1(cur)
        if not pending or not l1.alive():
            return
        for rid, att in pending.items():
            stale = att.get("stale_guest")
            if stale:
                try:
                    agent = self.agent(cur)
                    st = await agent.status(stale, timeout=SOURCE_QUIT_TIMEOUT)
                    if st.alive and st.region_id == rid:
                        await agent.stop_guest(stale, kill=True, timeout=SOURCE_QUIT_TIMEOUT)
                except AgentError as exc:
                    if exc.remote_type != BadInputError.__name__:
                        continue  # still not answering: next time
                cur.attachments[rid] = {k: v for k, v in att.items() if k != "stale_guest"}
        with contextlib.suppress(QMPCommandError):
            await settle_revoked(l1, cur)

    async def note_stale(self, vm: CloudVMRecord, region_id: str, guest: str) -> None:
        """Record that cloud VM ``vm`` may still run a (paused, memoryless) copy of
        ``guest`` on revoked region ``region_id``: it is stopped once the cloud VM answers."""
        async with self.plugging(vm) as cur:
            att = cur.attachments.get(region_id)
            if att is not None:
                cur.attachments[region_id] = {**att, "stale_guest": guest}

    async def settle(self, vm: CloudVMRecord, region_id: str, grace: float) -> bool:
        """Give a revoked region's eject (and the stop of a stale copy) up to ``grace``
        seconds; True once the device is gone from ``vm`` and its record settled."""
        deadline = time.monotonic() + grace
        while True:
            async with self.plugging(vm) as cur:
                if not self.l1(cur).alive():
                    return False
                if region_id not in cur.attachments:
                    return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)

    async def region_inode(self, vm: CloudVMRecord, region_id: str) -> int | None:
        """The inode of region ``region_id`` as cloud VM ``vm``'s QEMU holds it (None when
        it holds no such region)."""
        att = vm.attachments.get(region_id)
        l1 = self.l1(vm)
        if att is None or not l1.alive():
            return None
        for fdset in await l1.execute("query-fdsets"):
            if fdset["fdset-id"] == att["fdset"] and fdset["fds"]:
                with contextlib.suppress(OSError):
                    return os.stat(f"/proc/{l1.pid}/fd/{fdset['fds'][0]['fd']}").st_ino
        return None

    def running_vm(self, name: str) -> CloudVMRecord:
        rec = self.vm(name)
        l1 = self.l1(rec)
        if rec.state is not CloudVMState.RUNNING or not l1.alive():
            raise BadInputError(f"cloud VM {name!r} is not running ({rec.state.value})")
        if l1.ref.stopped():
            # L0's own view: nothing in it can answer until it is continued.
            raise BadInputError(f"cloud VM {name!r} is stopped (its QEMU, pid {rec.pid}, is "
                                f"stopped by a signal): nothing changed")
        return rec

    async def start_cloud_vm(self, name: str, tenant: str, memory: int | str = "2G",
                             cpus: int = CLOUD_VM_CPUS,
                             lab: LabNetwork | None = None) -> CloudVMRecord:
        """Boot a cloud VM and wait for its agent; raises LaunchError naming it (with its
        console's tail) when it does not come up, twice."""
        size = parse_size(memory)
        if not tenant:
            raise BadInputError("a cloud VM needs a tenant")
        check_name(name, "name")
        # Exclusive while it boots: no move or guest start uses a cloud VM half made, and
        # no other command starts or stops one of this name meanwhile.
        with self.store.lock_cloud_vm(name, shared=False):
            return await self._start_cloud_vm(name, tenant, size, cpus, lab)

    async def _start_cloud_vm(self, name: str, tenant: str, size: int, cpus: int,
                              lab: LabNetwork | None) -> CloudVMRecord:
        d = self.store.state_dir / "cloudvms" / name
        rec = CloudVMRecord(name=name, tenant=tenant, memory=size, cpus=cpus,
                            state=CloudVMState.STARTING, qmp_path=str(d / "qmp.sock"),
                            agent_path=str(d / "agent.sock"),
                            console_path=str(d / "console.log"), log_path=str(d / "qemu.log"))
        self.store.add_cloud_vm(rec)
        try:
            d.mkdir(parents=True, exist_ok=True)
            # The name was free until now: a QEMU still running in its directory was
            # orphaned by an earlier command that died (SIGKILL) while it booted.
            kill_strays(d)
            if lab is not None:
                async with self._setup_lock:  # one namespace, one address per cloud VM
                    await lab.create()
                    used = {vm.ip for vm in self.store.cloud_vms()}
                    rec.lab = lab.ns
                    rec.ip = next(a for a in (lab.address(i) for i in LAB_CLOUD_VM_HOSTS)
                                  if a not in used)
                    rec.tap = f"tap-{name}"[:15]
                    self.store.update_cloud_vm(rec)
                    await lab.add_tap(rec.tap)
            settings = self.rt.settings
            qemu = settings.resolve_qemu()
            from ..accel import resolve_accel
            rec.accel = await resolve_accel(settings.accel, qemu, settings.images_dir,
                                            settings.state_dir, cloud_vm=True)
            async with self._setup_lock:  # concurrent starts share one source disk
                disk = await asyncio.to_thread(build_source_disk, settings.state_dir,
                                               settings.images_dir, qemu)
            argv = cloudvm_argv(rec, qemu=qemu, accel=rec.accel, images_dir=settings.images_dir,
                                src_disk=disk, mac=mac_for(name),
                                tcg=TcgTuning.parse(settings.cloudvm_tcg))

            def spawned(proc: QemuProcess) -> None:
                # Each attempt (a restart replaces the first) is recorded before its agent
                # is waited on: `cloud-vm stop` stops what really runs.
                self.rt.procs.adopt(proc)
                rec.pid, rec.pid_start = proc.ref.pid, proc.ref.start_time
                self.store.update_cloud_vm(rec)

            await launch_cloudvm(rec, argv, lab, self.agent(rec), on_spawn=spawned)
            rec.state = CloudVMState.RUNNING
            self.store.update_cloud_vm(rec)
            return rec
        except BaseException:
            kill_strays(d)  # launch_cloudvm killed its QEMU; nothing else may run there
            agent = self._agents.pop(name, None)
            if agent is not None:
                await agent.close()
            if lab is not None and rec.tap:
                with contextlib.suppress(NetworkError):  # keep the error that got us here
                    await lab.remove_tap(rec.tap)
            self.store.remove_cloud_vm(name)
            raise

    async def stop_cloud_vm(self, name: str) -> None:
        """Stop the cloud VM's guests, then the cloud VM; its regions are released.

        Refused (:class:`~vmbeam_kvm.errors.CloudVMBusyError`, nothing changed) while a move
        into or out of it, a guest start in it, or its own start runs in another command:
        a guest a running move is placing there is never stopped beneath it."""
        self.vm(name)  # an unknown cloud VM is refused before any lock file
        with self.store.lock_cloud_vm(name, shared=False):
            await self._stop_cloud_vm(name)

    async def _stop_cloud_vm(self, name: str) -> None:
        for guest in self.store.guests():
            if guest.cloud_vm == name:
                await self.stop_guest(guest.name)
        rec = self.vm(name)
        proc = self.l1(rec)
        if proc.alive():
            await proc.quit(timeout=20)
        self.rt.procs.forget(proc)
        # What the record does not name runs too, if a start was interrupted before it
        # recorded its QEMU (``starting``, pid 0): found by its pidfile.
        kill_strays(self.store.state_dir / "cloudvms" / name)
        agent = self._agents.pop(name, None)
        if agent is not None:
            await agent.close()
        if rec.lab and rec.tap:
            await self.lab(rec).remove_tap(rec.tap)
        self.store.remove_cloud_vm(name)

    # -- guests in cloud VMs --------------------------------------------------------------
    def _guest_ip(self, vm: CloudVMRecord) -> str:
        """A free lab address for a guest (cloud VMs count up from .2, guests from .100)."""
        net = self.lab(vm)
        used = {g.ip for g in self.store.guests()} | {v.ip for v in self.store.cloud_vms()}
        return next(a for a in (net.address(i) for i in LAB_GUEST_HOSTS) if a not in used)

    def nic_args(self, rec: GuestRecord) -> dict[str, Any]:
        """The agent's NIC arguments for ``rec`` (none for a guest without an address)."""
        return {"mac": mac_for(f"l2:{rec.name}"), "ip": rec.ip} if rec.ip else {}

    async def start_guest(self, name: str, cloud_vm: str, memory: int | str, *,
                          image: str | None = None, touch: int | str = 70,
                          net: bool | None = None, cpus: int = 1,
                          disks: list[tuple[Path, str, bool]] | None = None,
                          disk_in_place: bool = False,
                          user_data: str | None = None) -> GuestRecord:
        """Create the guest's region on L0, attach it to ``cloud_vm``, start the L2 there.

        ``net`` gives the guest a NIC on the lab network (default: for Linux guests);
        ``disks``: files checked by :meth:`~vmbeam_kvm.host.Host.check_disks` (``beam``),
        given to it as beam disks (an overlay each in its state dir unless
        ``disk_in_place``); ``user_data``: a NoCloud seed follows them (:mod:`..seed`),
        with the guest's lab address in its network config.
        Raises BadInputError (nothing changed) or the error that stopped it (everything
        started is undone).
        """
        size, pct = parse_size(memory), parse_percent(touch)
        img = GuestImage.resolve(image, bool(disks))
        check_new_guest(self.store, name, size, in_cloud_vm=True)
        check_cpus(cpus)
        self.running_vm(cloud_vm)
        # Shared with moves, refused while it is stopped or started: a cloud VM never goes
        # away beneath a guest starting in it.
        with self.store.lock_cloud_vm(cloud_vm, shared=True):
            return await self._start_guest(name, self.running_vm(cloud_vm), size, pct,
                                           img.value, net, cpus, list(disks or []),
                                           disk_in_place, user_data)

    async def _start_guest(self, name: str, vm: CloudVMRecord, size: int, pct: int,
                           image: str, net: bool | None, cpus: int,
                           checked: list[tuple[Path, str, bool]],
                           in_place: bool, user_data: str | None = None) -> GuestRecord:
        rec = GuestRecord(name=name, image=image, memory=size, touch=pct, accel="tcg",
                          qemu="qemu-system-x86_64", state=GuestState.STARTING,
                          cloud_vm=vm.name, tenant=vm.tenant, cpus=cpus)
        if (image == "linux" if net is None else net) and vm.lab:
            rec.ip = self._guest_ip(vm)
        self.store.add_guest(rec)
        try:
            with self.store.lock_guest(name), BeamRegion.create(size, name, pow2=True) as reg:
                await self.attach(vm, reg)
                self.store.add_region(reg.region_id, name, vm.tenant, size, reg.size)
                rec.region_id = reg.region_id
                made: tuple[disk_files.Disk, ...] = ()
                if user_data is not None:
                    nic = self.nic_args(rec)
                    checked.append(seed_disk(
                        self.store.guest_dir(name), name=name, user_data=user_data,
                        net=(rec.ip, self.lab(vm).gateway, nic["mac"]) if rec.ip else None))
                if checked:
                    made = disk_files.new_disks(self.store.guest_dir(name), checked,
                                                in_place=in_place, beam=True)
                    rec.disks = disk_files.dumps(made)
                    self.store.update_guest(rec)
                    await self.attach_disks(vm, name, made)
                # A copy of a guest of this name left by one stopped while this cloud VM
                # was hung is stale by definition (the name was free): it goes first.
                await self.agent(vm).stop_guest(name, kill=True)
                started = await self.agent(vm).start_guest(
                    name, memory=size, image=image, touch=pct, region_id=reg.region_id,
                    cpus=cpus, disks=[d.wire(name) for d in made], **self.nic_args(rec))
                rec.pid, rec.state = started.pid, GuestState.RUNNING
                self.store.update_guest(rec)
                return rec
        except BaseException:
            with contextlib.suppress(VmbeamError):
                await self.agent(vm).stop_guest(name, kill=True)
            if rec.region_id:
                with contextlib.suppress(VmbeamError):
                    await self.release(vm, rec.region_id)
                self.store.remove_region(rec.region_id)
            if rec.disks:
                with contextlib.suppress(VmbeamError):
                    await self.release_disks(vm, name)
            self.store.remove_guest(name)
            shutil.rmtree(self.store.state_dir / "guests" / name, ignore_errors=True)
            raise

    async def stop_guest(self, name: str) -> None:
        """Stop every copy of the guest and release every region of it, wherever attached
        (after a move that needs action, both cloud VMs may hold one)."""
        rec = self.store.get_guest(name)
        with self.store.lock_guest(name):
            regions = {r["region_id"] for r in self.store.regions() if r["guest"] == name}
            regions |= {rec.region_id} - {""}
            for vm in self.store.cloud_vms():
                if vm.state is CloudVMState.RUNNING and self.l1(vm).alive():
                    # Every cloud VM is asked: one that was hung when the guest left it may
                    # still hold a stale copy (README "Patched QEMU").
                    home = vm.name == rec.cloud_vm
                    with contextlib.suppress(AgentError):
                        await self.agent(vm).stop_guest(
                            name, kill=not home,
                            timeout=None if home else SOURCE_QUIT_TIMEOUT)
                    for region_id in [r for r in regions if r in vm.attachments]:
                        await self.release(vm, region_id)
                if any(a.get("guest") == name for a in vm.disks().values()):
                    await self.release_disks(vm, name)  # a dead cloud VM's: records only
            for region_id in regions:
                self.store.remove_region(region_id)
            self.store.remove_guest(name)
            # Its overlays (on L0): no cloud VM holds them any more.
            shutil.rmtree(self.store.state_dir / "guests" / name, ignore_errors=True)

    async def l2_status(self, vm_name: str, name: str, wait: float = 0,
                        timeout: float | None = None) -> L2Status:
        """The agent's view of guest ``name`` in cloud VM ``vm_name``; :data:`GONE` when it
        certainly does not run there (the cloud VM is gone, or its agent has no such guest).
        ``wait``: how long to wait for an agent that is restarting; ``timeout``: for the
        call (None: the agent's call limit). AgentError when unknown (a cloud VM whose QEMU
        is stopped by a signal is not asked).
        """
        try:
            vm = self.vm(vm_name)
        except BadInputError:
            return GONE
        l1 = self.l1(vm)
        if vm.state is not CloudVMState.RUNNING or not l1.alive():
            return GONE
        if l1.ref.stopped():
            raise AgentError(f"cloud VM {vm_name} is stopped (its QEMU, pid {vm.pid}, is "
                             f"stopped by a signal)")
        try:
            if wait:
                await self.agent(vm).wait_ready(wait)
            return await self.agent(vm).status(name, timeout=timeout)
        except AgentError as exc:
            if exc.remote_type == BadInputError.__name__:
                return GONE  # the agent answered: it runs no such guest
            raise

    # -- the Placement interface ------------------------------------------------------------
    async def status(self, rec: GuestRecord, *, busy: bool = False) -> GuestStatus:
        st: L2Status | None = None
        if not busy:  # the agent channel is the busy command's until it is done
            with contextlib.suppress(VmbeamError):
                st = await self.l2_status(rec.cloud_vm, rec.name)
        if st is not None and not st.alive and rec.state is GuestState.RUNNING:
            # Its agent (or the cloud VM's end) says it is gone: record it, don't pretend.
            rec.state = GuestState.LOST
            self.store.update_guest(rec)
        hb = st.heartbeat if st is not None else None
        return GuestStatus(
            name=rec.name, state=rec.state.value, image=rec.image, memory_bytes=rec.memory,
            touch_percent=rec.touch, accel=rec.accel,
            pid=st.pid if st is not None and st.pid else rec.pid,
            alive=st is not None and st.alive, run_state=st.run_state if st else None,
            booted=hb is not None, ready=hb is not None, heartbeat=hb,
            memory_ok=None if hb is None else hb.ok, region_id=rec.region_id,
            instance=rec.instance, serial_log="", cloud_vm=rec.cloud_vm, tenant=rec.tenant,
            cpus=rec.cpus,
            ip=rec.ip, busy=busy, disks=[d.to_json() for d in disk_files.loads(rec.disks)],
            disk_acks=st.disk_acks if st is not None else {})

    async def stop(self, rec: GuestRecord) -> None:
        await self.stop_guest(rec.name)

    async def qmp(self, rec: GuestRecord, cmd: str, args: dict[str, Any] | None = None
                  ) -> Any:
        return await self.agent(self.vm(rec.cloud_vm)).qmp(rec.name, cmd, args)

    async def heartbeat(self, rec: GuestRecord) -> Heartbeat | None:
        return (await self.l2_status(rec.cloud_vm, rec.name)).heartbeat

    async def wait_heartbeat(self, rec: GuestRecord, after_seq: int = -1,
                             timeout: float = 120.0) -> Heartbeat | None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(AgentError):
                hb = await self.heartbeat(rec)
                if hb is not None and hb.seq > after_seq:
                    return hb
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.2)
