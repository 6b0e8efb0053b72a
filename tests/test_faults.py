"""The fault matrix: every failure of a move, at every journaled phase, on guests of every
history, in both topologies — generated from one table.

A cell reads ``<topology>-<what fails>@<when>-<mode>-<history>``. Each cell checks the promise:
the exit code (3 the source runs again, 4 only where running the source could make a second
copy, 1 when every copy died and the guest is ``lost``, 0 when the move still completed), exactly
one running copy with a good memory verdict and an advancing heartbeat, the store agreeing
with what QEMU (or the agents) report, the region attached only where the guest runs (asked of
L0's QEMUs, not the store), nothing left behind — and that the guest can move again.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from vmbeam_kvm import (
    Guest,
    Host,
    MigrationError,
    MigrationMode,
    MigrationOptions,
    SettleRefusedError,
    VmbeamError,
)
from vmbeam_kvm.agent.protocol import AgentClient
from vmbeam_kvm.lab import lab_network
from vmbeam_kvm.migrate.faults import injected
from vmbeam_kvm.migrate.routes import ram_fd_of
from vmbeam_kvm.qemu.process import QemuProcess
from vmbeam_kvm.region import read_identity_of
from vmbeam_kvm.store import GuestState

from .conftest import cli, qemu_pids, run_cli, settings_of

ZC, PC = MigrationMode.ZERO_COPY, MigrationMode.PRECOPY
MiB = 1 << 20


@dataclass(frozen=True)
class Cell:
    """One failure: ``what`` fails ``when`` during a ``mode`` move of a guest of ``history``;
    ``outcome`` is where the guest must run afterwards (source / dest / lost / held: the
    source kept paused for an operator) and ``rc`` the command's exit code."""

    topology: str
    what: str
    when: str
    mode: MigrationMode
    history: str
    outcome: str
    rc: int

    @property
    def id(self) -> str:
        return f"{self.topology}-{self.what}@{self.when}-{self.mode.value}-{self.history}"


# (what fails, when, modes, outcome, exit code); the crash rows' exit code is the dead
# command's (99), the outcome the one the next command settles on.
FLAT_FAULTS: list[tuple[str, str, tuple[MigrationMode, ...], str, int]] = [
    ("dst-start-fails", "prepare", (ZC, PC), "source", 3),
    ("dst-killed", "prepare", (ZC, PC), "source", 3),
    ("dst-killed", "mid-stream", (PC,), "source", 3),
    ("dst-killed", "confirm", (ZC, PC), "held", 4),  # it may have run: never resume the source
    ("src-killed", "prepare", (ZC, PC), "lost", 1),
    ("src-killed", "mid-stream", (PC,), "lost", 1),
    ("src-killed", "confirm", (ZC, PC), "dest", 0),  # handed over already: the move completes
    ("src-cancel", "mid-stream", (PC,), "source", 3),
    ("command-dies", "prepare", (ZC, PC), "source", 99),
    ("command-dies", "switch", (ZC, PC), "dest", 99),
    ("command-dies", "relocate", (ZC, PC), "dest", 99),
]
FLAT_HISTORIES = ("fresh", "moved-zero-copy", "moved-precopy")

FLAT_CELLS = [Cell("flat", what, when, mode, history, outcome, rc)
              for what, when, modes, outcome, rc in FLAT_FAULTS
              for mode in modes for history in FLAT_HISTORIES]


# -- flat -----------------------------------------------------------------------------------
@pytest.fixture
async def flat_guest(host: Host, cell: Cell) -> AsyncIterator[Guest]:
    """A 128 MiB test guest with the history the cell asks for."""
    async with await host.start_guest("fg", "128M", touch=70) as g:
        await g.wait_ready(timeout=60)
        if cell.history != "fresh":
            mode = ZC if cell.history == "moved-zero-copy" else PC
            res = await g.migrate(MigrationOptions(mode=mode))
            assert res.guest_ok
        yield g


async def _wait_streaming(execute: Callable[[str], Awaitable[Any]],
                          at_least: int = 8 * MiB) -> None:
    """Until a source's precopy (asked through ``execute``) has sent ``at_least`` bytes."""
    for _ in range(3000):
        info = await execute("query-migrate")
        if info.get("status") == "active" and info.get("ram", {}).get("transferred", 0) > at_least:
            return
        await asyncio.sleep(0.02)
    pytest.fail("precopy never got going")


def _memfd_inodes(pids: list[int]) -> set[int]:
    """The memfds (beam regions) held open by these processes."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if os.readlink(path).startswith("/memfd:"):
                    inodes.add(os.stat(path).st_ino)
            except OSError:
                continue
    return inodes


async def check_flat(g: Guest, outcome: str, src_pid: int) -> None:
    """The promise, asked of the QEMUs themselves."""
    host = g.host
    state_dir = str(host.settings.state_dir)
    rec = g.record
    assert host.store.unfinished_migrations(g.name) == []
    pids = qemu_pids(state_dir)
    assert not _memfd_inodes([os.getpid()]), "the test process holds a region fd"
    if outcome == "lost":
        assert rec.state is GuestState.LOST and pids == []
        return
    if outcome == "held":
        # The source is kept paused for an operator; the destination is gone.
        assert rec.state is GuestState.NEEDS_ACTION and pids == [src_pid] == [rec.pid]
        st = await host.process(rec).execute("query-status")
        assert st["status"] == "postmigrate" and st["running"] is False
        return
    assert rec.state is GuestState.RUNNING and pids == [rec.pid], (pids, rec)
    assert (rec.pid == src_pid) == (outcome == "source")
    proc = host.process(rec)
    assert await proc.execute("query-status") == {"status": "running", "running": True}
    # The store's region is the very one this QEMU maps, and no other region is held.
    assert read_identity_of(rec.pid, await ram_fd_of(proc)).region_id == rec.region_id
    assert len(_memfd_inodes(pids)) == 1
    hb = g.heartbeat()
    assert hb is not None
    later = await g.wait_heartbeat(hb.seq, timeout=30)
    assert later is not None and later.ok and later.bad == 0


async def _inject(g: Guest, cell: Cell) -> int:
    """Run the cell's move through the API with its fault; returns the exit code."""
    host = g.host
    src = host.process(g.record)
    opts = MigrationOptions(mode=cell.mode)
    if cell.when == "mid-stream":
        opts.max_bandwidth = 24 * MiB  # ~4 s of stream for ~90 MB: time to strike

    async def kill(proc: QemuProcess) -> None:
        os.kill(proc.pid, signal.SIGKILL)

    strike: Callable[[QemuProcess], Awaitable[None]] | None = None
    hooks: dict[str, Any] = {}
    target = {"dst-killed": "dst", "src-killed": "src", "src-cancel": "src"}.get(cell.what)
    if cell.what == "dst-start-fails":
        opts.qemu = "/bin/false"
    elif cell.when in ("prepare", "confirm"):
        async def strike_at(dst: QemuProcess) -> None:
            await kill(dst if target == "dst" else src)
        strike = strike_at
        hooks["before_switch" if cell.when == "prepare" else "after_switch"] = strike
    with injected(**hooks):
        task = asyncio.create_task(g.migrate(opts))
    if cell.when == "mid-stream":
        await _wait_streaming(src.execute)
        if cell.what == "src-cancel":
            await src.execute("migrate_cancel")
        elif target == "src":
            os.kill(src.pid, signal.SIGKILL)
        else:
            os.kill(host.store.unfinished_migrations(g.name)[0].dst_pid, signal.SIGKILL)
    try:
        await task
    except VmbeamError as exc:
        return exc.exit_code
    return 0


@pytest.mark.parametrize("cell", FLAT_CELLS, ids=[c.id for c in FLAT_CELLS])
async def test_flat_fault(cell: Cell, flat_guest: Guest) -> None:
    g = flat_guest
    src_pid = g.record.pid
    if cell.what == "command-dies":
        await g.host.process(g.record).close()  # QMP serves one client: let the CLI in
        proc = run_cli(g.host.settings.state_dir, "migrate", g.name, "--local", "--mode",
                       cell.mode.value, "--json", env={"VMBEAM_TEST_CRASH_AFTER": cell.when})
        assert proc.returncode == cell.rc, proc.stderr
        # The next command settles the journal: here `guest status` in a new process.
        st = run_cli(g.host.settings.state_dir, "guest", "status", g.name, "--json")
        assert st.returncode == 0, st.stderr
    else:
        rc = await _inject(g, cell)
        assert rc == cell.rc
    await check_flat(g, cell.outcome, src_pid)
    if cell.outcome in ("source", "dest"):
        res = await g.migrate(MigrationOptions(mode=ZC))  # ...and it can move again
        assert res.guest_ok is True and res.ram_transferred_bytes < MiB
        await check_flat(g, "dest", src_pid=-1)


async def test_flat_settle(host: Host) -> None:
    """`guest settle` on this host: a source kept paused after its destination died at
    confirm (needs-action) is refused while no copy runs (4, nothing changed); once an
    operator resumes it, settle keeps it and the guest moves again; a running guest has
    nothing to settle (2)."""
    async with await host.start_guest("fs", "128M", touch=70) as g:
        await g.wait_ready(timeout=60)
        src_pid = g.record.pid

        async def kill(dst: QemuProcess) -> None:
            os.kill(dst.pid, signal.SIGKILL)

        # Precopy: the destination had memory of its own, so the source's stays its own.
        with injected(after_switch=kill):
            task = asyncio.create_task(g.migrate(MigrationOptions(mode=PC)))
        with pytest.raises(MigrationError) as failed:
            await task
        assert failed.value.exit_code == 4
        await check_flat(g, "held", src_pid)
        with pytest.raises(SettleRefusedError) as refused:
            await g.settle()
        assert refused.value.exit_code == 4
        assert (refused.value.source, refused.value.destination) == ("not running", "gone")
        assert f"QEMU pid {src_pid}: not running" in str(refused.value)
        await check_flat(g, "held", src_pid)  # nothing changed
        await host.process(g.record).execute("cont")  # the operator: it never ran there
        res = await g.settle()
        assert (res.kept, res.source, res.destination, res.previous_state, res.pid) == (
            "source", "runs, memory good", "gone", "needs-action", src_pid)
        await check_flat(g, "source", src_pid)
        again = await g.migrate(MigrationOptions(mode=ZC))
        assert again.guest_ok is True
        await check_flat(g, "dest", src_pid=-1)
        await host.disconnect()
        proc = run_cli(host.settings.state_dir, "guest", "settle", "fs", "--json")
        assert proc.returncode == 2 and "nothing to settle" in proc.stderr, proc.stderr


# Rollback cells under KVM, where /dev/kvm runs the test guest (small: kvm_pvm pays about
# 0.4 ms per page first touched); the same promise as the TCG cells.
KVM_CELLS = [Cell("flat", "dst-killed", "prepare", ZC, "fresh", "source", 3),
             Cell("flat", "dst-start-fails", "prepare", PC, "moved-zero-copy", "source", 3)]


@pytest.mark.kvm
@pytest.mark.parametrize("cell", KVM_CELLS, ids=[f"kvm-{c.id}" for c in KVM_CELLS])
async def test_flat_fault_kvm(cell: Cell, kvm_host: Host) -> None:
    async with await kvm_host.start_guest("kf", "128M", touch=10) as g:
        await g.wait_ready(timeout=120)
        assert g.record.accel == "kvm"
        if cell.history == "moved-zero-copy":
            assert (await g.migrate(MigrationOptions(mode=ZC))).guest_ok
        src_pid = g.record.pid
        assert await _inject(g, cell) == cell.rc
        await check_flat(g, cell.outcome, src_pid)
        res = await g.migrate(MigrationOptions(mode=ZC))  # ...and it can move again
        assert res.guest_ok is True and res.ram_transferred_bytes < MiB
        await check_flat(g, "dest", src_pid=-1)


# -- nested ---------------------------------------------------------------------------------
NESTED_HISTORIES = ("fresh", "moved-zero-copy", "moved-precopy", "moved-away-and-back")
FRESH, ZC_ONCE, PC_ONCE, BACK = NESTED_HISTORIES

# (what fails, when, modes, outcome, exit code, histories). Every nested cell costs about a
# minute of TCG-in-TCG on 2 cores, so each row runs on the histories where it can differ:
# all four for the failures before the switch (the rule that once refused to resume a
# source that had itself arrived by migration), one or two elsewhere.
NESTED_FAULTS: list[tuple[str, str, tuple[MigrationMode, ...], str, int,
                          tuple[str, ...]]] = [
    ("dst-qemu-killed", "prepare", (ZC,), "source", 3, NESTED_HISTORIES),
    ("dst-qemu-killed", "prepare", (PC,), "source", 3, (FRESH,)),
    ("dst-qemu-killed", "mid-stream", (PC,), "source", 3, (BACK,)),
    ("dst-qemu-killed", "confirm", (ZC,), "held", 4, (PC_ONCE,)),
    ("src-qemu-killed", "prepare", (ZC,), "lost", 1, (FRESH, BACK)),
    ("src-cancel", "mid-stream", (PC,), "source", 3, (ZC_ONCE,)),
    ("dst-agent-restarted", "prepare", (ZC,), "source", 3, (PC_ONCE,)),
    ("command-dies", "share", (ZC,), "source", 99, (FRESH,)),
    ("command-dies", "share", (PC,), "source", 99, (BACK,)),
    ("command-dies", "prepare", (ZC,), "source", 99, NESTED_HISTORIES),
    ("command-dies", "switch", (ZC,), "dest", 99, (FRESH, BACK)),
    ("command-dies", "relocate", (ZC,), "dest", 99, (PC_ONCE,)),
    ("command-dies", "relocate", (PC,), "dest", 99, (FRESH,)),
    ("dst-cloud-vm-killed", "prepare", (ZC,), "source", 3, (BACK,)),
    ("src-cloud-vm-killed", "prepare", (ZC,), "lost", 1, (FRESH,)),
    # The source cloud VM paused (SIGSTOP of its QEMU on L0): before the switch the move
    # fails (3), the guest is `unreachable` meanwhile and runs in the source again once it
    # is continued; after the switch it needs action (4) until `guest settle` keeps the
    # destination. share: its QEMU's QMP stops answering; prepare: its agent, found stopped
    # by L0; mid-stream: an agent call that times out while the stream stalls.
    ("src-cloud-vm-paused", "share", (ZC,), "source", 3, (FRESH,)),
    ("src-cloud-vm-paused", "prepare", (ZC,), "source", 3, (ZC_ONCE,)),
    ("src-cloud-vm-paused", "mid-stream", (PC,), "source", 3, (FRESH,)),
    ("src-cloud-vm-paused", "confirm", (ZC,), "dest", 4, (FRESH,)),
]
NESTED_CELLS = [Cell("nested", what, when, mode, history, outcome, rc)
                for what, when, modes, outcome, rc, histories in NESTED_FAULTS
                for mode in modes for history in histories]
TENANT = "tenant-a"


def _other(vm: str) -> str:
    return "l1b" if vm == "l1a" else "l1a"


@pytest.fixture
async def lab_host(lab: dict[str, Any]) -> AsyncIterator[Host]:
    async with Host(settings_of(lab)) as host:
        yield host


@pytest.fixture
async def nested_guest(lab: dict[str, Any], lab_host: Host, cell: Cell) -> AsyncIterator[str]:
    """A 64 MiB test guest in l1a with the cell's history; afterwards it is stopped and
    any cloud VM the cell killed is booted again for the next cell."""
    host, name = lab_host, "ng"
    await host.cloud.start_guest(name, "l1a", "64M", touch=60)
    rec = host.store.get_guest(name)
    assert await host.cloud.wait_heartbeat(rec, timeout=120) is not None
    moves = {"fresh": [], "moved-zero-copy": [("l1b", ZC)], "moved-precopy": [("l1b", PC)],
             "moved-away-and-back": [("l1b", ZC), ("l1a", ZC)]}[cell.history]
    for to, mode in moves:
        assert (await host.cloud.migrate(name, to, mode)).guest_ok
    try:
        yield name
    finally:
        await host.disconnect()
        await host.recover()
        host.cloud.reap()  # records cloud VMs that died
        await host.stop_guest(name, missing_ok=True)
        await revive(host)
        await host.disconnect()
        assert cli(lab, "region", "list") == []


async def revive(host: Host) -> None:
    """Boot again any cloud VM a cell killed (it is recorded lost by then)."""
    host.cloud.reap()
    for vm in host.store.cloud_vms():
        if vm.state.value != "running":
            await host.cloud.stop_cloud_vm(vm.name)
            await host.cloud.start_cloud_vm(vm.name, TENANT, lab=lab_network(host.settings))


async def _objects(host: Host, vm: str) -> set[str]:
    """The region objects L0's QEMU of cloud VM ``vm`` holds (its own view, not the store)."""
    rec = host.cloud.vm(vm)
    l1 = host.cloud.l1(rec)
    if not l1.alive():
        return set()
    return {o["name"] for o in await l1.execute("qom-list", {"path": "/objects"})
            if o["name"].startswith("region-")}


async def check_nested(host: Host, name: str, outcome: str, src_vm: str,
                       dst_vm: str) -> None:
    """The promise, asked of the agents and of L0's QEMUs; the store must agree."""
    await host.recover()  # what the next command does first
    host.cloud.reap()
    rec = host.store.get_guest(name)
    assert host.store.unfinished_migrations(name) == []
    assert not _memfd_inodes([os.getpid()]), "the test process holds a region fd"
    running = {vm.name for vm in host.store.cloud_vms() if vm.state.value == "running"}
    where = {"source": src_vm, "dest": dst_vm, "held": src_vm}.get(outcome)
    copies = {}
    for vm in sorted(running & {"l1a", "l1b"}):
        agent = host.cloud.agent(host.cloud.vm(vm))
        if name in (await agent.wait_ready(60))["guests"]:
            copies[vm] = await agent.call("status", name=name)
    objs = {vm: await _objects(host, vm) for vm in sorted(running & {"l1a", "l1b"})}
    short = f"region-{rec.region_id[:8]}"
    if outcome == "lost":
        assert rec.state is GuestState.LOST
        assert not any(c["alive"] for c in copies.values()), copies
        # What is left of its memory stays only where it ran, until `guest stop`.
        assert short not in objs.get(dst_vm, set()), objs
        return
    if outcome == "held":
        assert rec.state is GuestState.NEEDS_ACTION and rec.cloud_vm == src_vm
        assert copies[src_vm]["run_state"] == "postmigrate"  # kept, never resumed
        assert not copies.get(dst_vm, {"alive": False})["alive"]
        return
    assert rec.state is GuestState.RUNNING and rec.cloud_vm == where, rec
    assert list(copies) == [where], f"copies of the guest in {list(copies)}"
    st = copies[where]
    assert st["alive"] and st["run_state"] == "running"
    assert st["region_id"] == rec.region_id
    # Through L0's QMP: the region is attached where the guest runs, and only there.
    assert {vm: short in o for vm, o in objs.items()} == {
        vm: vm == where for vm in objs}, objs
    assert all(len(o) == (1 if vm == where else 0) for vm, o in objs.items()), objs
    regions = [r for r in host.store.regions() if r["guest"] == name]
    assert [r["region_id"] for r in regions] == [rec.region_id]
    hb0 = await host.cloud.heartbeat(rec)
    hb1 = await host.cloud.wait_heartbeat(rec, hb0.seq if hb0 else -1, timeout=60)
    assert hb1 is not None and hb1.ok and hb1.bad == 0


async def _nested_strike(host: Host, cell: Cell, name: str, src_vm: str, dst_vm: str
                         ) -> int:
    """Run the cell's move with its fault through the API; returns the exit code."""
    src_agent = host.cloud.agent(host.cloud.vm(src_vm))

    async def act(dst_agent: AgentClient) -> None:
        if cell.what == "dst-qemu-killed":
            await dst_agent.call("signal", name=name, signum=signal.SIGKILL)
        elif cell.what == "src-qemu-killed":
            await src_agent.call("signal", name=name, signum=signal.SIGKILL)
        elif cell.what == "dst-agent-restarted":
            await dst_agent.call("restart")  # the agent exits; init starts it again
            await asyncio.sleep(0.5)
        elif cell.what == "src-cancel":
            await src_agent.qmp(name, "migrate_cancel")
        elif cell.what == "src-cloud-vm-paused":
            os.kill(host.cloud.vm(src_vm).pid, signal.SIGSTOP)
        else:  # a cloud VM's QEMU on L0
            vm = dst_vm if cell.what == "dst-cloud-vm-killed" else src_vm
            os.kill(host.cloud.vm(vm).pid, signal.SIGKILL)
            await asyncio.sleep(0.2)

    hooks: dict[str, Any] = {}
    if cell.when == "share":
        hooks["at_share"] = act
    elif cell.when == "prepare":
        hooks["before_switch"] = act
    elif cell.when == "confirm":
        hooks["after_switch"] = act
    with injected(**hooks):
        task = asyncio.create_task(host.cloud.migrate(name, dst_vm, cell.mode))
    if cell.when == "mid-stream":
        await _wait_streaming(functools.partial(src_agent.qmp, name))
        await act(host.cloud.agent(host.cloud.vm(dst_vm)))
    try:
        await task
    except VmbeamError as exc:
        return exc.exit_code
    return 0


@pytest.mark.parametrize("cell", NESTED_CELLS, ids=[c.id for c in NESTED_CELLS])
async def test_nested_fault(cell: Cell, lab: dict[str, Any], lab_host: Host,
                            nested_guest: str) -> None:
    name = nested_guest
    src_vm = lab_host.store.get_guest(name).cloud_vm
    dst_vm = _other(src_vm)
    if cell.what == "command-dies":
        await lab_host.disconnect()  # QMP and agent channels serve one client: let it in
        proc = run_cli(lab["state"], "migrate", name, "--to", dst_vm, "--mode",
                       cell.mode.value, "--json",
                       env={**lab["env"], "VMBEAM_TEST_CRASH_AFTER": cell.when})
        assert proc.returncode == cell.rc, proc.stderr
    elif cell.what == "src-cloud-vm-paused":
        await _paused_source(lab, lab_host, cell, name, src_vm, dst_vm)
    else:
        assert await _nested_strike(lab_host, cell, name, src_vm, dst_vm) == cell.rc
    await check_nested(lab_host, name, cell.outcome, src_vm, dst_vm)
    if cell.outcome in ("source", "dest"):  # ...and it can move again, by the CLI
        where = src_vm if cell.outcome == "source" else dst_vm
        await revive(lab_host)  # the cloud VM a cell killed is booted again first
        await lab_host.disconnect()
        res = cli(lab, "migrate", name, "--to", _other(where))
        assert res["guest_ok"] is True and res["source_detached"] is True
        await check_nested(lab_host, name, "dest", where, _other(where))


# -- a paused source cloud VM ---------------------------------------------------------------
# Each agent call (and each QMP command to a cloud VM's QEMU) that meets the paused source
# waits this long rather than 60 s; the calls that must succeed take a few seconds at most.
PAUSED_CALL_TIMEOUT = "15"


async def _paused_source(lab: dict[str, Any], host: Host, cell: Cell, name: str, src_vm: str,
                         dst_vm: str) -> None:
    """The move with its source cloud VM paused; while paused: one copy at most runs, the
    guest cannot be moved (2) nor settled (4: the source cannot be asked); continued: a
    guest that needs action is settled by `guest settle` (the copy that runs is kept)."""
    os.environ["VMBEAM_AGENT_CALL_TIMEOUT"] = PAUSED_CALL_TIMEOUT
    src_pid = host.cloud.vm(src_vm).pid
    try:
        assert await _nested_strike(host, cell, name, src_vm, dst_vm) == cell.rc
        await host.disconnect()
        await host.recover()  # what the next command does first: quick, the source is paused
        rec = host.store.get_guest(name)
        dst_agent = host.cloud.agent(host.cloud.vm(dst_vm))
        dst_has = name in (await dst_agent.wait_ready(60))["guests"]
        if cell.rc == 3:
            assert rec.state is GuestState.UNREACHABLE and rec.cloud_vm == src_vm, rec
            # The destination never ran and is gone, with its hold on the region.
            assert not dst_has
            assert not {o for o in await _objects(host, dst_vm)
                        if o == f"region-{rec.region_id[:8]}"}
            assert [m.phase.value for m in host.store.unfinished_migrations(name)] == [
                "source-pending"]
        else:
            assert rec.state is GuestState.NEEDS_ACTION
            st = await dst_agent.call("status", name=name)
            assert st["alive"] and st["run_state"] == "running"  # the only copy that may run
        await host.disconnect()
        refused = cli(lab, "migrate", name, "--to", dst_vm, rc=2)
        assert rec.state.value in refused["error"]
        unsettled = cli(lab, "guest", "settle", name, rc=4)
        assert f"source in cloud VM {src_vm}: unknown" in unsettled["error"], unsettled
        assert (unsettled["source"], unsettled["destination"]) == (
            "unknown", "gone" if cell.rc == 3 else "runs, memory good"), unsettled
        assert host.store.get_guest(name).state is rec.state  # nothing changed
    finally:
        os.kill(src_pid, signal.SIGCONT)
        os.environ.pop("VMBEAM_AGENT_CALL_TIMEOUT", None)
    await host.cloud.agent(host.cloud.vm(src_vm)).wait_ready(120)
    if cell.rc == 4:
        src_st = await host.cloud.agent(host.cloud.vm(src_vm)).call("status", name=name)
        assert src_st["run_state"] != "running", src_st  # handed over: never two running
        await host.disconnect()
        settled = cli(lab, "guest", "settle", name)
        assert settled["kept"] == "destination" and settled["cloud_vm"] == dst_vm, settled
        assert settled["source"] == "not running" and settled["previous_state"] == (
            "needs-action")


async def test_paused_source_cloud_vm_before_migrate(lab: dict[str, Any],
                                                     lab_host: Host) -> None:
    """Finding 7 of issue 15: a move from a paused cloud VM was refused only after 70 s,
    exit 4, and left the guest needs-action for good. Now it is refused at once as bad
    input (L0 sees the cloud VM's QEMU stopped): nothing changed, the guest stays running
    and, continued, moves; `guest settle` has nothing to settle (2)."""
    host, name = lab_host, "pg"
    await host.cloud.start_guest(name, "l1a", "64M", touch=60)
    try:
        assert await host.cloud.wait_heartbeat(host.store.get_guest(name),
                                               timeout=120) is not None
        await host.disconnect()
        pid = host.cloud.vm("l1a").pid
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = asyncio.get_running_loop().time()
            refused = cli(lab, "migrate", name, "--to", "l1b", rc=2)
            assert asyncio.get_running_loop().time() - t0 < 30
            assert "l1a" in refused["error"] and "stopped" in refused["error"]
            st = cli(lab, "guest", "status", name)
            assert st["state"] == "running", st
            assert host.store.migrations(name) == []
        finally:
            os.kill(pid, signal.SIGCONT)
        await host.cloud.agent(host.cloud.vm("l1a")).wait_ready(120)
        await host.disconnect()
        assert "nothing to settle" in cli(lab, "guest", "settle", name, rc=2)["error"]
        res = cli(lab, "migrate", name, "--to", "l1b")
        assert res["guest_ok"] is True and res["source_detached"] is True
        await check_nested(host, name, "dest", "l1a", "l1b")
    finally:
        await host.disconnect()
        await host.stop_guest(name, missing_ok=True)
        await host.disconnect()
