"""Evacuating and rejuvenating cloud VMs on the lab: every guest out at once, zero-copy,
guests of every history, one failure that rolls back alone, and the guests movable after."""

from __future__ import annotations

import contextlib
import signal
from typing import Any

from vmbeam_kvm import Host, MigrationMode
from vmbeam_kvm.agent.protocol import AgentClient
from vmbeam_kvm.migrate.faults import injected
from vmbeam_kvm.store import GuestState

from .conftest import cli, run_cli, settings_of

MiB = 1 << 20


async def _regions_in(host: Host, vm: str) -> set[str]:
    """Region objects L0's QEMU of cloud VM ``vm`` holds (its own view, not the store)."""
    l1 = host.cloud.l1(host.cloud.vm(vm))
    return {o["name"] for o in await l1.execute("qom-list", {"path": "/objects"})
            if o["name"].startswith("region-")}


async def _check_runs_in(host: Host, name: str, vm: str) -> None:
    """The guest runs in ``vm`` only, with a good memory verdict; its region is plugged
    there and in no other cloud VM of tenant-a (asked of L0's QEMUs)."""
    rec = host.store.get_guest(name)
    assert rec.state is GuestState.RUNNING and rec.cloud_vm == vm, rec
    st = await host.status(name)
    assert st.run_state == "running" and st.memory_ok is True, st
    short = f"region-{rec.region_id[:8]}"
    for other in ("l1a", "l1b"):
        assert (short in await _regions_in(host, other)) == (other == vm), other
    other_vm = "l1b" if vm == "l1a" else "l1a"
    guests = (await host.cloud.agent(host.cloud.vm(other_vm)).wait_ready(60))["guests"]
    assert name not in guests, f"a copy of {name} is left in {other_vm}"


async def _cleanup(host: Host, names: tuple[str, ...]) -> None:
    """Whatever a failed test left: its guests go, so the next test finds free slots."""
    await host.disconnect()
    await host.recover()
    host.cloud.reap()
    for n in names:
        with contextlib.suppress(Exception):
            await host.stop_guest(n, missing_ok=True)
    await host.disconnect()


async def _start(host: Host, name: str, vm: str = "l1a") -> None:
    await host.cloud.start_guest(name, vm, "64M", touch=40)
    assert await host.cloud.wait_heartbeat(host.store.get_guest(name), timeout=120)


async def test_evacuate_guests_of_every_history(lab: dict[str, Any]) -> None:
    """Three guests — fresh, moved away and back zero-copy, moved by precopy and back —
    leave l1a at once through the CLI; each runs in l1b afterwards and moves again."""
    names = ("ev-fresh", "ev-back", "ev-pc")
    async with Host(settings_of(lab)) as host:
        try:
            await _every_history(lab, host, names)
        finally:
            await _cleanup(host, names)
    assert cli(lab, "region", "list") == []


async def _every_history(lab: dict[str, Any], host: Host, names: tuple[str, ...]) -> None:
    """Three guests with their histories, evacuated through the CLI, then moved again."""
    for n in names:
        await _start(host, n)
    await host.cloud.migrate("ev-back", "l1b")
    await host.cloud.migrate("ev-back", "l1a")
    await host.cloud.migrate("ev-pc", "l1b", MigrationMode.PRECOPY)
    await host.cloud.migrate("ev-pc", "l1a")
    await host.disconnect()  # the CLI needs the agent channels
    out = cli(lab, "cloud-vm", "evacuate", "l1a", "--to", "l1b", timeout=600)
    assert out["summary"]["completed"] == 3 and out["summary"]["exit_code"] == 0, out
    assert out["parallel"] >= 1 and {m["guest"] for m in out["moves"]} == set(names)
    for m in out["moves"]:
        assert m["status"] == "completed" and m["dest_cloud_vm"] == "l1b"
        assert m["result"]["mode"] == "zero-copy" and m["result"]["guest_ok"] is True
        assert m["result"]["ram_transferred_bytes"] < MiB
        # The pause each guest saw, where its ticks reached the meter (the figures stay
        # None when none arrived in time on a loaded host: tests/test_pause.py pins them).
        assert m["pause_ms"] is None or m["pause_ms"] > 0
    for n in names:
        await _check_runs_in(host, n, "l1b")
    await host.disconnect()
    # Nothing is left to evacuate, and the guests move on as usual.
    again = cli(lab, "cloud-vm", "evacuate", "l1a", "--to", "l1b")
    assert again["moves"] == [] and again["summary"]["exit_code"] == 0
    for n in names:
        assert (await host.cloud.migrate(n, "l1a")).guest_ok
        await _check_runs_in(host, n, "l1a")
    for n in names:
        await host.stop_guest(n)
    await host.disconnect()


async def test_evacuation_with_one_failure_rolls_back_alone(lab: dict[str, Any]) -> None:
    """The incoming QEMU of one guest dies before the switch: that guest stays in l1a
    (exit 3 for the evacuation), the others arrive in l1b; all of them move again."""
    names = ("ef-1", "ef-victim", "ef-3")
    victim = "ef-victim"
    struck: list[bool] = []

    async def kill_victim(dst_agent: AgentClient) -> None:
        # Called by every move at the end of its prepare, given the destination's agent:
        # the victim's incoming QEMU exists by the time its own move calls this.
        if not struck:
            with contextlib.suppress(Exception):
                await dst_agent.call("signal", name=victim, signum=signal.SIGKILL)
                struck.append(True)

    async with Host(settings_of(lab)) as host:
        try:
            for n in names:
                await _start(host, n)
            with injected(before_switch=kill_victim):
                ev = await host.evacuate("l1a", ["l1b"])
            assert struck, "the fault was never injected"
            by = {m.guest: m for m in ev.moves}
            assert by[victim].status == "failed" and by[victim].exit_code == 3, \
                by[victim].error
            assert ev.exit_code == 3
            for n in names:
                if n != victim:
                    assert by[n].status == "completed", by[n].error
                    await _check_runs_in(host, n, "l1b")
            await _check_runs_in(host, victim, "l1a")
            assert (await host.cloud.migrate(victim, "l1b")).guest_ok  # it moves again
            for n in names:
                await _check_runs_in(host, n, "l1b")
        finally:
            await _cleanup(host, names)
    assert cli(lab, "region", "list") == []


async def test_rejuvenate_restarts_the_cloud_vm_under_its_guests(lab: dict[str, Any]) -> None:
    names = ("rj-1", "rj-2")
    async with Host(settings_of(lab)) as host:
        try:
            await _rejuvenate(lab, host, names)
        finally:
            await _cleanup(host, names)


async def _rejuvenate(lab: dict[str, Any], host: Host, names: tuple[str, ...]) -> None:
    """Two guests in l1a; l1a rejuvenated through the CLI; they are back in it."""
    for n in names:
        await _start(host, n)
    old_pid = host.cloud.vm("l1a").pid
    await host.disconnect()
    out = cli(lab, "cloud-vm", "rejuvenate", "l1a", "--json", timeout=900)
    assert out["restarted"] is True and out["exit_code"] == 0, out
    assert [m["status"] for m in out["out"]["moves"]] == ["completed"] * 2
    assert [m["status"] for m in out["back"]["moves"]] == ["completed"] * 2
    assert all(m["dest_cloud_vm"] == "l1a" for m in out["back"]["moves"]), out
    assert all(m["pause_ms"] is None or m["pause_ms"] > 0 for m in out["back"]["moves"])
    assert host.cloud.vm("l1a").pid != old_pid  # a fresh cloud VM
    for n in names:
        await _check_runs_in(host, n, "l1a")
    for n in names:
        await host.stop_guest(n)
    await host.disconnect()


async def test_evacuate_refuses_what_it_cannot_do(lab: dict[str, Any]) -> None:
    """Bad requests: exit 2, one line, nothing moved."""
    async with Host(settings_of(lab)) as host:
        try:
            await _start(host, "eb")
            await host.disconnect()
            for args, why in ((["--to", "l1c"], "belongs to tenant"),
                              (["--to", "l1a"], "into itself"),
                              (["--to", "nosuch"], "no cloud VM named")):
                proc = run_cli(lab["state"], "cloud-vm", "evacuate", "l1a", *args,
                               env=lab["env"])
                assert proc.returncode == 2, proc.stderr
                assert why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
            await _check_runs_in(host, "eb", "l1a")
            assert [m.id for m in host.store.migrations("eb")] == []
        finally:
            await _cleanup(host, ("eb",))
