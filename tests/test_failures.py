"""Failures before the switch leave the source running with its memory intact; never two copies."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

from vmbeam_kvm import (
    BeamRegion,
    Guest,
    GuestBusyError,
    Host,
    MigrationError,
    MigrationMode,
    MigrationOptions,
)
from vmbeam_kvm.migrate.faults import injected
from vmbeam_kvm.qemu.process import QemuProcess
from vmbeam_kvm.store import GuestState, MigrationPhase

from .conftest import qemu_pids


async def assert_source_healthy(guest: Guest, src_pid: int) -> None:
    """Same QEMU, running, heartbeat advancing with a good verdict, and alone."""
    rec = guest.record
    assert rec.pid == src_pid and rec.state is GuestState.RUNNING
    assert await guest.qmp("query-status") == {"status": "running", "running": True}
    hb = guest.heartbeat()
    assert hb is not None
    later = await guest.wait_heartbeat(hb.seq, timeout=30)
    assert later is not None and later.ok and later.bad == 0
    assert qemu_pids(str(guest.host.settings.state_dir)) == [src_pid]
    last = guest.host.store.migrations(guest.name)[-1]
    assert last.phase is MigrationPhase.FAILED and last.error


async def test_destination_maps_other_region_refused(guest: Guest) -> None:
    src = guest.record.pid
    with (BeamRegion.create(guest.record.memory, "impostor") as other,
          injected(dest_region=other),
          pytest.raises(MigrationError, match="switch refused") as err):
        await guest.migrate(MigrationOptions())
    assert err.value.source_resumed and err.value.exit_code == 3
    await assert_source_healthy(guest, src)


async def test_destination_killed_before_switch(guest: Guest) -> None:
    src = guest.record.pid

    async def kill(dst: QemuProcess) -> None:
        os.kill(dst.pid, signal.SIGKILL)

    with pytest.raises(MigrationError) as err, injected(before_switch=kill):
        await guest.migrate(MigrationOptions(mode=MigrationMode.ZERO_COPY))
    assert err.value.source_resumed
    await assert_source_healthy(guest, src)


@pytest.fixture
async def guest512(host: Host) -> AsyncIterator[Guest]:
    """A 512 MiB guest: precopy of its ~360 MB takes long enough to interfere with."""
    async with await host.start_guest("big", "512M", touch=70) as g:
        await g.wait_ready(timeout=60)
        yield g


async def test_destination_killed_mid_precopy(guest512: Guest) -> None:
    g, host = guest512, guest512.host
    src = g.record.pid
    task = asyncio.create_task(g.migrate(MigrationOptions(mode=MigrationMode.PRECOPY)))
    # Wait until RAM is really streaming, then kill the destination.
    for _ in range(2000):
        info = await host.process(g.record).execute("query-migrate")
        if info.get("status") == "active" and info["ram"]["transferred"] > 20 << 20:
            break
        await asyncio.sleep(0.005)
    else:
        pytest.fail("precopy never got going")
    dst_pid = host.store.unfinished_migrations(g.name)[0].dst_pid
    os.kill(dst_pid, signal.SIGKILL)
    with pytest.raises(MigrationError, match="destination QEMU died") as err:
        await task
    assert err.value.source_resumed
    await assert_source_healthy(g, src)


async def test_destination_refuses_stream(guest: Guest) -> None:
    src = guest.record.pid

    async def mismatch(dst: QemuProcess) -> None:
        # Capabilities must match on both sides (docs/design.md §4.5): the destination will refuse.
        await dst.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": False}]})

    with (injected(before_switch=mismatch),
          pytest.raises(MigrationError, match="x-ignore-shared") as err):
        await guest.migrate(MigrationOptions())
    assert err.value.source_resumed
    await assert_source_healthy(guest, src)


async def test_timeout_before_switch(guest512: Guest) -> None:
    src = guest512.record.pid
    with pytest.raises(MigrationError, match="timed out") as err:
        # Precopy of ~360 MB cannot finish in 50 ms.
        await guest512.migrate(MigrationOptions(mode=MigrationMode.PRECOPY, timeout=0.05))
    assert err.value.source_resumed
    await assert_source_healthy(guest512, src)


async def test_already_migrating_is_refused(guest: Guest) -> None:
    with guest.host.store.lock_guest(guest.name), pytest.raises(GuestBusyError):
        await guest.migrate()
    assert len(guest.host.store.migrations(guest.name)) == 0


async def test_not_running_guest_refused(guest: Guest) -> None:
    await guest.qmp("stop")
    from vmbeam_kvm import BadInputError
    with pytest.raises(BadInputError, match="not running"):
        await guest.migrate()
    await guest.qmp("cont")
