"""The virtual IaaS topology: cloud VMs (L1) on this host, guests (L2) inside them.

This host plays L0. A guest inside a cloud VM has its RAM in a beam region on L0 that is
hot-plugged into that cloud VM. Migrating it to a co-located cloud VM of the same tenant runs
VMBeam's phases, each journaled: *share* (attach the region to the destination too),
*prepare* (the destination agent verifies the region and starts the incoming L2 QEMU on it),
*switch* (device state only over the L1-L1 network; the destination confirmed running; the
source L2 quits), *relocate* (detach the region from the source cloud VM). Precopy is the
fallback: the destination gets a fresh region and QEMU copies the RAM over the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .agent.protocol import AgentClient, AgentError
from .cloudvm import (
    CLOUD_VM_CPUS,
    CloudVMRecord,
    CloudVMState,
    TcgTuning,
    attach_region,
    build_source_disk,
    cloudvm_argv,
    detach_region,
    launch_cloudvm,
    mac_for,
)
from .config import Settings
from .errors import BadInputError, GuestLostError, MigrationError, VmbeamError
from .heartbeat import Heartbeat
from .migration import (
    SWITCH_STARTED,
    MigrationMode,
    MigrationResult,
    Rollback,
    crash_point,
    resume_source,
    settle_incoming,
    wait_for_handover,
)
from .qemu.process import ProcessRef, QemuProcess, cpu_seconds
from .region import BeamRegion
from .store import GuestRecord, GuestState, MigrationPhase, MigrationRecord
from .units import parse_percent, parse_size

if TYPE_CHECKING:
    from .host import Host
    from .net import LabNetwork

log = logging.getLogger(__name__)

# A test's fault injection at a point of a nested migration, given the destination agent.
FaultHook = Callable[[AgentClient], Awaitable[None]]
# The embedded default topology of `lab up`.
DEFAULT_LAB = {"tenant-a": ["l1a", "l1b"], "tenant-b": ["l1c"]}


def lab_network(settings: Settings | None = None) -> LabNetwork:
    """The lab network of these settings (namespace and subnet are settings)."""
    from .net import LabNetwork
    s = settings or Settings()
    return LabNetwork(s.lab_ns, s.lab_subnet)


async def lab_up(host: Host) -> dict[str, list[str]]:
    """Boot the embedded default lab (idempotent); tenant -> cloud VM names."""
    net = lab_network(host.settings)
    have = {vm.name for vm in host.store.cloud_vms()}
    todo = [(t, n) for t, names in DEFAULT_LAB.items() for n in names if n not in have]
    try:
        await asyncio.gather(*(host.cloud.start_cloud_vm(n, t, lab=net) for t, n in todo))
    except BaseException:
        await lab_down(host)
        raise
    vms = host.store.cloud_vms()
    return {t: [v.name for v in vms if v.tenant == t] for t in DEFAULT_LAB}


async def lab_down(host: Host) -> None:
    """Stop every guest and cloud VM and remove the lab network."""
    await host.stop_all()
    await asyncio.to_thread(lab_network(host.settings).destroy)


@dataclass
class NestedResult(MigrationResult):
    """A nested migration's figures, with what the paper's evaluation looks at."""

    source_cloud_vm: str = ""
    dest_cloud_vm: str = ""
    source_detached: bool = False
    network_bytes: int = 0     # bytes that crossed the destination cloud VM's NIC
    tls: bool = False          # the stream was TLS with a per-migration pre-shared key
    l0_cpu_seconds: float = 0.0  # CPU of every QEMU on L0 (the cloud VMs) meanwhile


class CloudOps:
    """Cloud VMs and the guests inside them, for one :class:`~vmbeam_kvm.host.Host`."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.store = host.store
        self._agents: dict[str, AgentClient] = {}
        self._setup_lock = asyncio.Lock()
        self._plug_locks: dict[str, asyncio.Lock] = {}

    async def close(self) -> None:
        for agent in self._agents.values():
            await agent.close()
        self._agents.clear()

    # -- cloud VMs ------------------------------------------------------------------------
    def vm(self, name: str) -> CloudVMRecord:
        return self.store.get_cloud_vm(name)

    def l1(self, rec: CloudVMRecord) -> QemuProcess:
        return self.host.attach_process(ProcessRef(rec.pid, rec.pid_start),
                                        Path(rec.qmp_path), Path(rec.log_path))

    def agent(self, rec: CloudVMRecord) -> AgentClient:
        client = self._agents.get(rec.name)
        if client is None or str(client.path) != rec.agent_path:
            client = self._agents[rec.name] = rec.agent
        return client

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
                yield cur
            finally:
                for rid in before.keys() | cur.attachments.keys():
                    if before.get(rid) != cur.attachments.get(rid):
                        self.store.record_attachment(vm.name, rid, cur.attachments.get(rid))
                vm.attachments = cur.attachments

    def running_vm(self, name: str) -> CloudVMRecord:
        rec = self.vm(name)
        if rec.state is not CloudVMState.RUNNING or not self.l1(rec).alive():
            raise BadInputError(f"cloud VM {name!r} is not running ({rec.state.value})")
        return rec

    async def start_cloud_vm(self, name: str, tenant: str, memory: int | str = "2G",
                             cpus: int = CLOUD_VM_CPUS,
                             lab: LabNetwork | None = None) -> CloudVMRecord:
        """Boot a cloud VM and wait for its agent."""
        size = parse_size(memory)
        if not tenant:
            raise BadInputError("a cloud VM needs a tenant")
        self.host.validate_name(name)
        d = self.store.state_dir / "cloudvms" / name
        rec = CloudVMRecord(name=name, tenant=tenant, memory=size, cpus=cpus,
                            state=CloudVMState.STARTING, qmp_path=str(d / "qmp.sock"),
                            agent_path=str(d / "agent.sock"),
                            console_path=str(d / "console.log"), log_path=str(d / "qemu.log"))
        self.store.add_cloud_vm(rec)
        try:
            d.mkdir(parents=True, exist_ok=True)
            if lab is not None:
                async with self._setup_lock:  # one namespace, one address per cloud VM
                    # pyroute2's sync API runs its own event loop: keep it off ours.
                    await asyncio.to_thread(lab.create)
                    used = {vm.ip for vm in self.store.cloud_vms()}
                    rec.lab = lab.ns
                    rec.ip = next(a for a in (lab.address(i) for i in range(1, 250))
                                  if a not in used)
                    rec.tap = f"tap-{name}"[:15]
                    self.store.update_cloud_vm(rec)
                    await asyncio.to_thread(lab.add_tap, rec.tap)
            settings = self.host.settings
            qemu = settings.resolve_qemu()
            from .accel import resolve_accel
            accel = await resolve_accel(settings.accel, qemu, settings.images_dir,
                                        settings.state_dir)
            async with self._setup_lock:  # concurrent starts share one source disk
                disk = await asyncio.to_thread(build_source_disk, settings.state_dir,
                                               settings.images_dir)
            argv = cloudvm_argv(rec, qemu=qemu, accel=accel, images_dir=settings.images_dir,
                                src_disk=disk, mac=mac_for(name),
                                tcg=TcgTuning.parse(settings.cloudvm_tcg))
            proc = await launch_cloudvm(rec, argv, lab, self.agent(rec))
            self.host.adopt(proc)
            rec.pid, rec.pid_start = proc.ref.pid, proc.ref.start_time
            rec.state = CloudVMState.RUNNING
            self.store.update_cloud_vm(rec)
            return rec
        except BaseException:
            if lab is not None and rec.tap:
                await asyncio.to_thread(lab.remove_tap, rec.tap)
            self.store.remove_cloud_vm(name)
            raise

    async def stop_cloud_vm(self, name: str) -> None:
        """Stop the cloud VM's guests, then the cloud VM; its regions are released."""
        rec = self.vm(name)
        for guest in self.store.guests():
            if guest.cloud_vm == name:
                await self.stop_guest(guest.name)
        rec = self.vm(name)
        proc = self.l1(rec)
        if proc.alive():
            await proc.quit(timeout=20)
        self.host.forget(proc)
        agent = self._agents.pop(name, None)
        if agent is not None:
            await agent.close()
        if rec.lab and rec.tap:
            from .net import LabNetwork
            await asyncio.to_thread(LabNetwork(rec.lab, self.host.settings.lab_subnet)
                                    .remove_tap, rec.tap)
        self.store.remove_cloud_vm(name)

    # -- guests in cloud VMs --------------------------------------------------------------
    def _guest_ip(self, vm: CloudVMRecord) -> str:
        """A free lab address for a guest (cloud VMs count up from .2, guests from .100)."""
        from .net import LabNetwork
        net = LabNetwork(vm.lab, self.host.settings.lab_subnet)
        used = {g.ip for g in self.store.guests()} | {v.ip for v in self.store.cloud_vms()}
        return next(a for a in (net.address(i) for i in range(99, 250)) if a not in used)

    def _nic_args(self, rec: GuestRecord) -> dict[str, Any]:
        return {"mac": mac_for(f"l2:{rec.name}"), "ip": rec.ip} if rec.ip else {}

    async def start_guest(self, name: str, cloud_vm: str, memory: int | str, *,
                          image: str = "test", touch: int | str = 70,
                          net: bool | None = None) -> GuestRecord:
        """Create the guest's region on L0, attach it to ``cloud_vm``, start the L2 there.

        ``net`` gives the guest a NIC on the lab network (default: for Linux guests).
        """
        size, pct = parse_size(memory), parse_percent(touch)
        if image not in ("test", "linux"):
            raise BadInputError(f"unknown image {image!r}: use test or linux")
        self.host.validate_new_guest(name, size)
        vm = self.running_vm(cloud_vm)
        rec = GuestRecord(name=name, image=image, memory=size, touch=pct, accel="tcg",
                          qemu="qemu-system-x86_64", state=GuestState.STARTING,
                          cloud_vm=vm.name, tenant=vm.tenant)
        if (image == "linux" if net is None else net) and vm.lab:
            rec.ip = self._guest_ip(vm)
        self.store.add_guest(rec)
        proc = self.l1(vm)
        try:
            with self.store.lock_guest(name), BeamRegion.create(size, name, pow2=True) as reg:
                async with self.plugging(vm) as cur:
                    await attach_region(proc, cur, reg)
                self.store.add_region(reg.region_id, name, vm.tenant, size, reg.size)
                rec.region_id = reg.region_id
                started = await self.agent(vm).call(
                    "start_guest", name=name, memory=size, image=image, touch=pct,
                    region_id=reg.region_id, **self._nic_args(rec))
                rec.pid, rec.state = int(started["pid"]), GuestState.RUNNING
                self.store.update_guest(rec)
                return rec
        except BaseException:
            with contextlib.suppress(VmbeamError):
                await self.agent(vm).call("stop_guest", name=name, kill=True)
            if rec.region_id:
                with contextlib.suppress(VmbeamError):
                    async with self.plugging(vm) as cur:
                        await detach_region(proc, cur, rec.region_id)
                self.store.remove_region(rec.region_id)
            self.store.remove_guest(name)
            raise

    async def stop_guest(self, name: str) -> None:
        """Stop every copy of the guest and release every region of it, wherever attached
        (after a migration that needs action, both cloud VMs may hold one)."""
        rec = self.store.get_guest(name)
        with self.store.lock_guest(name):
            regions = {r["region_id"] for r in self.store.regions() if r["guest"] == name}
            regions |= {rec.region_id} - {""}
            for vm in self.store.cloud_vms():
                held = [r for r in regions if r in vm.attachments]
                if (vm.name != rec.cloud_vm and not held) or not self.l1(vm).alive():
                    continue
                with contextlib.suppress(AgentError):
                    await self.agent(vm).call("stop_guest", name=name)
                async with self.plugging(vm) as cur:
                    for region_id in held:
                        await detach_region(self.l1(cur), cur, region_id)
            for region_id in regions:
                self.store.remove_region(region_id)
            self.store.remove_guest(name)

    async def guest_status(self, rec: GuestRecord) -> dict[str, Any]:
        """The agent's view of the guest; ``{"alive": False}`` when it is certainly gone
        (its cloud VM is gone or its agent has no such guest). AgentError when unknown."""
        return await self._l2_status(rec.cloud_vm, rec.name)

    async def _l2_status(self, vm_name: str, name: str, wait: float = 0) -> dict[str, Any]:
        gone: dict[str, Any] = {"alive": False, "run_state": None}
        try:
            vm = self.vm(vm_name)
        except BadInputError:
            return gone
        if vm.state is not CloudVMState.RUNNING or not self.l1(vm).alive():
            return gone
        try:
            if wait:
                await self.agent(vm).wait_ready(wait)
            st: dict[str, Any] = await self.agent(vm).call("status", name=name)
            return st
        except AgentError as exc:
            if exc.remote_type == BadInputError.__name__:
                return gone  # the agent answered: it runs no such guest
            raise

    async def heartbeat(self, rec: GuestRecord) -> Heartbeat | None:
        hb = (await self.guest_status(rec)).get("heartbeat")
        return None if hb is None else Heartbeat(**hb)

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

    # -- migration ------------------------------------------------------------------------
    async def migrate(self, name: str, to: str, mode: MigrationMode | None = None, *,
                      before_switch: FaultHook | None = None,
                      after_switch: FaultHook | None = None) -> NestedResult:
        """Move guest ``name`` to cloud VM ``to`` (``mode`` None = auto).

        ``before_switch`` / ``after_switch`` are fault-injection hooks for tests, given the
        destination agent (after the switch = the source completed, before confirming).
        """
        with self.store.lock_guest(name, "migrated"):
            rec = self.store.get_guest(name)
            if not rec.cloud_vm:
                raise BadInputError(f"guest {name!r} runs on this host, not in a cloud VM: "
                                    f"use --local")
            if rec.state is not GuestState.RUNNING:
                raise BadInputError(f"guest {name!r} is {rec.state.value}")
            src_vm, dst_vm = self.running_vm(rec.cloud_vm), self.running_vm(to)
            if src_vm.name == dst_vm.name:
                raise BadInputError(f"guest {name!r} already runs in {to!r}")
            if dst_vm.tenant != rec.tenant:
                self.store.log_event("refused", name, f"cross-tenant migration to {to} "
                                     f"(tenant {dst_vm.tenant}, guest of {rec.tenant})")
                raise BadInputError(f"refused: cloud VM {to!r} belongs to tenant "
                                    f"{dst_vm.tenant!r}, guest {name!r} to {rec.tenant!r}")
            # Both cloud VMs are on this L0 and share the tenant: zero-copy applies.
            mode = mode or MigrationMode.ZERO_COPY
            if mode is MigrationMode.CPR_TRANSFER:
                raise BadInputError("cpr-transfer is a local-only mode")
            run = _NestedRun(self, rec, src_vm, dst_vm, mode)
            run.before_switch, run.after_switch = before_switch, after_switch
            return await run.execute()


    async def recover(self, rec: GuestRecord, mig: MigrationRecord) -> None:
        """Resolve a nested migration whose command died.

        The rule of the flat engine, with the agents as the eyes: a destination L2 that
        runs is the guest (the source goes, and its cloud VM lets go of the region); one
        that never ran is dropped and the source resumes; when neither can be told apart
        safely the guest is flagged ``needs-action`` and nothing is touched. The caller
        holds the guest's lock.
        """
        try:
            if not mig.src_cloud_vm:
                raise _Unresolvable("journal predates cloud-VM recovery")
            verdict = await self._recover(rec, mig)
        except (_Unresolvable, VmbeamError) as exc:
            rec.state = GuestState.NEEDS_ACTION
            self.store.update_guest(rec)
            self.store.journal(mig.id, MigrationPhase.FAILED,
                               error=f"nested migration interrupted: needs action: {exc}")
            return
        log.info("recovered migration %d of %s: %s", mig.id, rec.name, verdict)

    async def _recover(self, rec: GuestRecord, mig: MigrationRecord) -> str:
        store, name = self.store, rec.name
        try:  # the agents may be restarting: give them a moment, then decide
            src = await self._l2_status(mig.src_cloud_vm, name, wait=30)
            dst: dict[str, Any] = {"alive": False, "run_state": None}
            if mig.dst_cloud_vm:
                dst = await self._l2_status(mig.dst_cloud_vm, name, wait=30)
        except AgentError as exc:
            raise _Unresolvable(f"cannot see both sides: {exc}") from exc
        if dst["alive"] and dst["run_state"] == "inmigrate" and src["alive"]:
            dst["run_state"] = await settle_incoming(
                functools.partial(self.agent(self.vm(mig.src_cloud_vm)).qmp, name),
                functools.partial(self.agent(self.vm(mig.dst_cloud_vm)).qmp, name))
            if dst["run_state"] is None:
                raise _Unresolvable("the destination stopped answering while it settled")
        if dst["alive"] and dst["run_state"] == "running":
            # The switch happened: the destination is the guest, the source must never run.
            src_vm = self.vm(mig.src_cloud_vm)
            if src["alive"]:
                await self.agent(src_vm).call("stop_guest", name=name, kill=True)
            await self._release(src_vm, mig.src_region, keep=mig.dst_region)
            rec.cloud_vm, rec.pid = mig.dst_cloud_vm, int(dst["pid"])
            rec.region_id, rec.state = mig.dst_region, GuestState.RUNNING
            store.update_guest(rec)
            store.journal(mig.id, MigrationPhase.DONE,
                          error="recovered after a crash: destination kept")
            return "destination kept"
        never_ran = bool(dst["alive"]) and dst["run_state"] == "inmigrate"
        if dst["alive"]:
            await self.agent(self.vm(mig.dst_cloud_vm)).call("stop_guest", name=name,
                                                             kill=True)
        if mig.dst_cloud_vm and mig.dst_region:
            with contextlib.suppress(BadInputError):
                await self._release(self.vm(mig.dst_cloud_vm), mig.dst_region,
                                    keep=mig.src_region)
        rec.cloud_vm, rec.region_id = mig.src_cloud_vm, mig.src_region
        if not src["alive"]:
            rec.state = GuestState.LOST
            store.update_guest(rec)
            store.journal(mig.id, MigrationPhase.FAILED,
                          error="recovered after a crash: both copies gone")
            return "both copies gone"
        # A source that handed over to a destination now gone is refused here (needs action).
        await resume_source(functools.partial(self.agent(self.vm(mig.src_cloud_vm)).qmp, name),
                            name, dest_never_ran=never_ran,
                            switch_started=mig.phase in SWITCH_STARTED)
        rec.pid, rec.state = int(src["pid"]), GuestState.RUNNING
        store.update_guest(rec)
        store.journal(mig.id, MigrationPhase.FAILED,
                      error="recovered after a crash: source resumed")
        return "source resumed"

    async def _release(self, vm: CloudVMRecord, region_id: str, keep: str) -> None:
        """Detach ``region_id`` from ``vm``; forget the region unless it is ``keep``."""
        l1 = self.l1(vm)
        if l1.alive():
            async with self.plugging(vm) as cur:
                await detach_region(l1, cur, region_id)
        if region_id and region_id != keep:
            self.store.remove_region(region_id)


class _Unresolvable(Exception):
    """Internal: recovery cannot tell which copy may run; an operator must decide."""


class _NestedRun:
    """One nested migration through share → prepare → switch → relocate."""

    def __init__(self, ops: CloudOps, rec: GuestRecord, src_vm: CloudVMRecord,
                 dst_vm: CloudVMRecord, mode: MigrationMode) -> None:
        self.ops, self.rec, self.src_vm, self.dst_vm, self.mode = ops, rec, src_vm, dst_vm, mode
        self.store = ops.store
        self.src_agent, self.dst_agent = ops.agent(src_vm), ops.agent(dst_vm)
        self.src_l1, self.dst_l1 = ops.l1(src_vm), ops.l1(dst_vm)
        self.phases: dict[str, float] = {}
        self._mark = time.monotonic()
        self.dst_started = False
        self.switch_started = False  # this run asked the source to migrate
        self.dst_region_id = ""
        self.tls = ops.host.settings.migration_tls.applies(mode is MigrationMode.ZERO_COPY)
        self.before_switch: FaultHook | None = None
        self.after_switch: FaultHook | None = None

    def _done(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = round((now - self._mark) * 1000, 3)
        self._mark = now

    async def execute(self) -> NestedResult:
        name = self.rec.name
        # Both agent channels for the whole move, taken in one global order so that two
        # commands moving guests in opposite directions cannot each hold one and wait.
        for agent in sorted((self.src_agent, self.dst_agent), key=lambda a: a.name):
            await agent.connect()
        mig_id = self.store.begin_migration(name, self.mode.value, self.rec.pid, 0)
        self.rec.state = GuestState.MIGRATING
        self.store.update_guest(self.rec)
        cpu0 = sum(cpu_seconds(p.pid) for p in (self.src_l1, self.dst_l1))
        net0 = await asyncio.to_thread(self._net_bytes)
        try:
            # ---- SHARE: the guest's region (or a fresh one for precopy) to the dest ----
            self.store.journal(mig_id, MigrationPhase.SHARE, src_cloud_vm=self.src_vm.name,
                               dst_cloud_vm=self.dst_vm.name, src_region=self.rec.region_id)
            try:
                if self.mode is MigrationMode.ZERO_COPY:
                    region = await self._reopen_region()
                else:
                    region = BeamRegion.create(self.rec.memory, name, pow2=True)
                with region:
                    # Journaled before the hot-plug, so recovery knows what to take back.
                    self.dst_region_id = region.region_id
                    self.store.journal(mig_id, MigrationPhase.SHARE,
                                       dst_region=region.region_id)
                    if self.mode is not MigrationMode.ZERO_COPY:
                        self.store.add_region(region.region_id, name, self.rec.tenant,
                                              self.rec.memory, region.size)
                    async with self.ops.plugging(self.dst_vm) as cur:
                        await attach_region(self.dst_l1, cur, region)
                crash_point(MigrationPhase.SHARE)
                self._done("share")
                # ---- PREPARE: the destination agent verifies the region, starts L2 ----
                self.store.journal(mig_id, MigrationPhase.PREPARE)
                # The NIC (a tap on l1b's lab bridge) is plumbed before the switch.
                started = await self.dst_agent.call(
                    "start_guest", name=name, memory=self.rec.memory, image=self.rec.image,
                    touch=self.rec.touch, region_id=self.dst_region_id, incoming=True,
                    **self.ops._nic_args(self.rec))
                self.dst_started = True
                # Every capability and parameter is set on both ends every time: a QEMU
                # that arrived by migration keeps what its last migration was given.
                zero_copy = self.mode is MigrationMode.ZERO_COPY
                caps = {"return-path": True, "x-ignore-shared": zero_copy}
                creds = await self._migration_tls()
                ends = (
                    # A TCG guest rewrites its pages faster than the L1-L1 virtio link
                    # carries them: without throttling, precopy never converges.
                    (self.src_agent, {**caps, "auto-converge": not zero_copy},
                     {"tls-creds": creds, "max-bandwidth": 64 << 30, "downtime-limit": 500}),
                    (self.dst_agent, caps, {"tls-creds": creds}))
                for agent, end_caps, params in ends:
                    await agent.qmp(name, "migrate-set-capabilities", {"capabilities": [
                        {"capability": c, "state": on} for c, on in end_caps.items()]})
                    await agent.qmp(name, "migrate-set-parameters", params)
                # Port 0: the kernel picks a free one, so moves into one cloud VM can overlap.
                await self.dst_agent.qmp(name, "migrate-incoming", {"uri": "tcp:0.0.0.0:0"})
                listening = await self.dst_agent.qmp(name, "query-migrate")
                port = int(listening["socket-address"][0]["port"])
                if self.before_switch is not None:
                    await self.before_switch(self.dst_agent)
                # Last look before the point of no return: the destination's agent and its
                # incoming QEMU must both still be there.
                st = await self.dst_agent.call("status", name=name, timeout=10)
                if st.get("agent_pid") != started.get("agent_pid"):
                    raise BadInputError("the destination agent restarted during prepare")
                if st.get("run_state") != "inmigrate":
                    raise BadInputError(f"destination QEMU is {st.get('run_state')}")
                crash_point(MigrationPhase.PREPARE)
                self._done("prepare")
            except VmbeamError as exc:
                raise Rollback(f"preparing the destination failed: {exc}") from exc
            # ---- SWITCH: device state over the L1-L1 network --------------------------
            self.store.journal(mig_id, MigrationPhase.SWITCH)
            hb0 = await self.ops.heartbeat(self.rec)
            t0 = time.monotonic()
            dst_ip = self.dst_vm.ip.split("/")[0]
            try:
                self.switch_started = True
                await self.src_agent.qmp(name, "migrate",
                                         {"uri": f"tcp:{dst_ip}:{port}"})
            except VmbeamError as exc:
                raise Rollback(f"source refused to migrate: {exc}") from exc
            info = await self._wait_source()
            crash_point(MigrationPhase.SWITCH)
            if self.after_switch is not None:
                await self.after_switch(self.dst_agent)
            self._done("switch")
            # ---- CONFIRM ------------------------------------------------------------------
            self.store.journal(mig_id, MigrationPhase.CONFIRM)
            new_pid = await self._wait_dest_running()
            t1 = time.monotonic()
            cpu = sum(cpu_seconds(p.pid) for p in (self.src_l1, self.dst_l1)) - cpu0
            net = await asyncio.to_thread(self._net_bytes) - net0
            self._done("confirm")
            # ---- RELOCATE: source L2 quits; its cloud VM lets go of the region --------
            self.store.journal(mig_id, MigrationPhase.RELOCATE)
            old_region, old_pid = self.rec.region_id, self.rec.pid
            self.rec.cloud_vm, self.rec.pid = self.dst_vm.name, new_pid
            self.rec.region_id, self.rec.state = self.dst_region_id, GuestState.RUNNING
            self.store.update_guest(self.rec)
            crash_point(MigrationPhase.RELOCATE)
            await self.src_agent.call("stop_guest", name=name)
            async with self.ops.plugging(self.src_vm) as cur:
                await detach_region(self.src_l1, cur, old_region)
            if old_region != self.dst_region_id:
                self.store.remove_region(old_region)
            detached = await self._detached_from_source(old_region)
            self._done("relocate")
            hb1 = await self.ops.wait_heartbeat(self.rec, hb0.seq if hb0 else -1, timeout=60)
            result = NestedResult(
                guest=name, mode=self.mode.value, status="completed",
                total_ms=round((t1 - t0) * 1000, 3), downtime_ms=info.get("downtime"),
                ram_transferred_bytes=int(info.get("ram", {}).get("transferred", 0)),
                shared_frames_ratio=None, guest_ok=hb1 is not None and hb1.ok,
                qemu_total_ms=info.get("total-time"), phases_ms=self.phases,
                source_pid=old_pid, dest_pid=new_pid, migration_id=mig_id,
                memory_bytes=self.rec.memory, source_cloud_vm=self.src_vm.name,
                dest_cloud_vm=self.dst_vm.name, source_detached=detached,
                network_bytes=net, l0_cpu_seconds=round(cpu, 3), qemu_cpu_seconds=round(cpu, 3),
                tls=self.tls)
            self.store.journal(mig_id, MigrationPhase.DONE, result=result.to_json())
            return result
        except Rollback as exc:
            try:
                await self._rollback(mig_id, str(exc))
            except GuestLostError:
                raise
            except VmbeamError as unsafe:
                self._needs_action(mig_id, f"{exc}; rollback: {unsafe}")
                if isinstance(unsafe, MigrationError):
                    raise
                raise MigrationError(f"migration of {name!r} failed ({exc}) and its source "
                                     f"could not be resumed: {unsafe}",
                                     source_resumed=False) from unsafe
            self.rec.state = GuestState.RUNNING
            self.store.update_guest(self.rec)
            self.store.journal(mig_id, MigrationPhase.FAILED, error=str(exc))
            raise MigrationError(f"migration of {name!r} failed, guest still running in "
                                 f"{self.src_vm.name}: {exc}", source_resumed=True) from exc
        except (MigrationError, VmbeamError) as exc:
            self._needs_action(mig_id, str(exc))
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(f"migration of {name!r} failed after the switch: {exc}",
                                 source_resumed=False) from exc

    def _needs_action(self, mig_id: int, why: str) -> None:
        self.rec.state = GuestState.NEEDS_ACTION
        self.store.update_guest(self.rec)
        self.store.journal(mig_id, MigrationPhase.FAILED, error=why)

    async def _migration_tls(self) -> str:
        """A fresh pre-shared key for both ends (or "" = TLS off); returns the creds id."""
        if not self.tls:
            return ""
        key = secrets.token_hex(32)
        result: dict[str, str] = {}
        for agent, endpoint in ((self.src_agent, "client"), (self.dst_agent, "server")):
            result = await agent.call("migration_tls", name=self.rec.name, endpoint=endpoint,
                                      key=key)
        return result["tls_creds"]

    def _net_bytes(self) -> int:
        """rx+tx bytes of the destination cloud VM's tap (its whole L1-L1 traffic)."""
        if not self.dst_vm.lab or not self.dst_vm.tap:
            return 0
        from pyroute2 import NetNS
        with NetNS(self.dst_vm.lab) as ns:
            for link in ns.get_links(ifname=self.dst_vm.tap):
                stats = link.get("IFLA_STATS64")
                if stats:
                    return int(stats["rx_bytes"]) + int(stats["tx_bytes"])
        return 0

    async def _reopen_region(self) -> BeamRegion:
        """Our own handle on the guest's region, taken from the source cloud VM's QEMU."""
        att = self.src_vm.attachments.get(self.rec.region_id)
        if att is None:
            raise BadInputError(f"region {self.rec.region_id} is not attached to "
                                f"{self.src_vm.name}")
        for fdset in await self.src_l1.execute("query-fdsets"):
            if fdset["fdset-id"] == att["fdset"]:
                return BeamRegion.open_from_process(self.src_l1.pid, fdset["fds"][0]["fd"],
                                                    self.rec.region_id)
        raise BadInputError(f"fdset {att['fdset']} of region {self.rec.region_id} is gone")

    async def _wait_source(self) -> dict[str, Any]:
        timeout = (60 if self.mode is MigrationMode.ZERO_COPY
                   else 120 + 120 * self.rec.memory / (1 << 30))
        # Every poll is an agent round trip inside the L1s: not tighter than 5 ms.
        return await wait_for_handover(functools.partial(self.src_agent.qmp, self.rec.name),
                                       timeout, poll=0.005)

    async def _wait_dest_running(self) -> int:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(VmbeamError):
                st = await self.dst_agent.call("status", name=self.rec.name)
                if st["run_state"] == "running":
                    return int(st["pid"])
                if not st["alive"]:
                    break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        raise MigrationError(f"destination in {self.dst_vm.name} did not run after the switch; "
                             f"source kept paused", source_resumed=False)

    async def _detached_from_source(self, region_id: str) -> bool:
        """Checked through L0's QMP: the source cloud VM no longer has the region's device."""
        short = region_id[:8]
        objs = await self.src_l1.execute("qom-list", {"path": "/objects"})
        return not any(o["name"] == f"region-{short}" for o in objs)

    async def _rollback(self, mig_id: int, why: str) -> None:
        """Destination L2 and its region attachment go; the source runs (never both)."""
        name = self.rec.name
        dst_alive = self.dst_l1.alive()
        if self.dst_started and dst_alive:
            with contextlib.suppress(VmbeamError):
                # The agent may be restarting: wait for it rather than leave the
                # incoming QEMU behind.
                await self.dst_agent.wait_ready(30)
                await self.dst_agent.call("stop_guest", name=name, kill=True)
        if self.dst_region_id:
            async with self.ops.plugging(self.dst_vm) as cur:
                if dst_alive:
                    with contextlib.suppress(VmbeamError):
                        await detach_region(self.dst_l1, cur, self.dst_region_id)
                else:  # a dead cloud VM's QEMU holds nothing any more
                    cur.attachments.pop(self.dst_region_id, None)
            if self.dst_region_id != self.rec.region_id:
                self.store.remove_region(self.dst_region_id)
        src = await self.ops._l2_status(self.src_vm.name, name, wait=10)
        if not src["alive"]:
            # The destination never ran and is gone: no copy is left anywhere.
            self.rec.state = GuestState.LOST
            self.store.update_guest(self.rec)
            self.store.journal(mig_id, MigrationPhase.FAILED,
                               error=f"{why}; source gone: guest lost")
            where = ("its cloud VM died" if not self.src_l1.alive()
                     else "its L2 QEMU is gone")
            raise GuestLostError(f"migration of {name!r} failed and its source in "
                                 f"{self.src_vm.name} is gone ({where}): the guest is lost "
                                 f"({why})")
        await resume_source(functools.partial(self.src_agent.qmp, name), name,
                            switch_started=self.switch_started)


__all__ = ["DEFAULT_LAB", "CloudOps", "NestedResult", "lab_down", "lab_network", "lab_up"]
