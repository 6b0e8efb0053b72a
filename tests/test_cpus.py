"""Guests of several vCPUs (``guest start --cpus N``): both ends of every move run the same
``-smp``, asked of the destination QEMU itself (``query-cpus-fast``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmbeam_kvm import Host, MigrationMode, MigrationOptions

from .conftest import qemu_pids, run_cli

MiB = 1 << 20


@pytest.mark.parametrize("cpus", [1, 2, 4, 8])
async def test_flat_moves_keep_the_vcpus(host: Host, cpus: int) -> None:
    async with await host.start_guest("smp", "64M", touch=50, cpus=cpus) as g:
        await g.wait_ready(timeout=60)
        assert len(await g.qmp("query-cpus-fast")) == cpus
        assert (await g.status()).cpus == cpus
        for mode in (MigrationMode.ZERO_COPY, MigrationMode.PRECOPY):
            src = g.record.pid
            res = await g.migrate(MigrationOptions(mode=mode))
            assert res.guest_ok is True and res.dest_pid != src
            assert qemu_pids(str(host.settings.state_dir)) == [g.record.pid]
            # The destination QEMU, not the store, says how many vCPUs the guest has.
            assert len(await g.qmp("query-cpus-fast")) == cpus
            hb = g.heartbeat()
            assert hb is not None and hb.ok
        if cpus == 2:
            assert res.ram_transferred_bytes > 16 * MiB  # the last move copied its RAM


def test_cli_cpus(state_dir: Path) -> None:
    """``--cpus`` on the command line; out-of-range counts are bad input (exit 2)."""
    for bad in ("0", "65", "two"):
        proc = run_cli(state_dir, "guest", "start", "c", "--memory", "64M",
                       "--cpus", bad, "--json")
        assert proc.returncode == 2, proc.stderr
    proc = run_cli(state_dir, "guest", "start", "c", "--memory", "64M",
                   "--cpus", "3", "--json")
    try:
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["cpus"] == 3
        st = run_cli(state_dir, "guest", "status", "c", "--json")
        assert json.loads(st.stdout)["cpus"] == 3
    finally:
        run_cli(state_dir, "guest", "stop", "c")
