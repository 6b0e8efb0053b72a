"""Moves that overlap: two guests at once, a second command on a guest in flight, and
`guest stop` during a move — never half a guest, never a lost update."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from vmbeam_kvm import GuestBusyError, Host, MigrationMode, MigrationOptions
from vmbeam_kvm.migrate.faults import injected
from vmbeam_kvm.qemu.process import QemuProcess
from vmbeam_kvm.store import GuestState

from .conftest import qemu_pids, run_cli

MiB = 1 << 20


@pytest.fixture
async def two(host: Host) -> AsyncIterator[tuple[str, str]]:
    for name in ("ca", "cb"):
        await host.start_guest(name, "128M", touch=70)
    for name in ("ca", "cb"):
        await (await host.guest(name)).wait_ready(timeout=60)
    yield "ca", "cb"


async def test_two_guests_moved_at_once(host: Host, two: tuple[str, str]) -> None:
    for mode in (MigrationMode.ZERO_COPY, MigrationMode.PRECOPY):
        results = await asyncio.gather(*(host.migrate(n, MigrationOptions(mode=mode))
                                         for n in two))
        assert all(r.guest_ok for r in results)
    pids = sorted(host.store.get_guest(n).pid for n in two)
    assert sorted(qemu_pids(str(host.settings.state_dir))) == pids
    for name in two:
        st = await host.status(name)
        assert st.run_state == "running" and st.memory_ok


async def _in_flight(host: Host, name: str, hold: float) -> asyncio.Task[object]:
    """A move of ``name`` that stays in flight (destination prepared, before the switch) for
    ``hold`` seconds; returned once the guest is recorded migrating."""
    async def linger(_dst: QemuProcess) -> None:
        await asyncio.sleep(hold)

    opts = MigrationOptions(mode=MigrationMode.ZERO_COPY)
    with injected(before_switch=linger):
        task: asyncio.Task[object] = asyncio.create_task(host.migrate(name, opts))
    for _ in range(3000):
        if host.store.get_guest(name).state is GuestState.MIGRATING:
            return task
        await asyncio.sleep(0.01)
    pytest.fail("the move never got going")


async def test_second_command_on_a_guest_in_flight_is_busy(host: Host,
                                                           two: tuple[str, str]) -> None:
    name = two[0]
    task = await _in_flight(host, name, hold=8.0)
    before = [m.id for m in host.store.migrations(name)]
    proc = await asyncio.to_thread(run_cli, host.settings.state_dir, "migrate", name,
                                   "--local", "--json")
    assert proc.returncode == 2 and "busy" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    stop = await asyncio.to_thread(run_cli, host.settings.state_dir, "guest", "stop", name)
    assert stop.returncode == 2, stop.stderr  # refused, not half done
    with pytest.raises(GuestBusyError):
        await host.stop_guest(name)
    # The refusals journaled nothing of their own.
    assert [m.id for m in host.store.migrations(name)] == before
    res = await task
    assert getattr(res, "guest_ok", False) is True
    st = await host.status(name)
    assert st.state == "running" and st.memory_ok
    assert len(qemu_pids(str(host.settings.state_dir))) == 2
