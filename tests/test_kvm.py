"""The KVM path: flat moves of guests running under ``-accel kvm``, and what ``auto`` picks.

These run wherever ``/dev/kvm`` runs the test guest at all, even slowly (``kvm_pvm`` here:
about 4 s to boot, about 0.4 ms per page first touched), so the guests are small and touch
little; they are skipped, with the reason, only where it cannot (``kvm_runs``). Under KVM a
destination maps the shared region lazily (few pages present in both QEMUs), so the frames
ratio is asked of the pages present in both, as under TCG. ``pytest -k kvm`` selects them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmbeam_kvm import Guest, Host, MigrationMode, MigrationOptions
from vmbeam_kvm.accel import (
    MIN_FILL_RATIO,
    MIN_WORK_RATIO,
    ProbeRun,
    decide,
    resolve_accel,
    verdict,
)
from vmbeam_kvm.config import Accel, Settings
from vmbeam_kvm.qemu.machine import RamBackend

from .conftest import qemu_pids, run_cli

pytestmark = pytest.mark.kvm
MiB = 1 << 20


async def _kvm_guest(host: Host, name: str, backend: RamBackend = RamBackend.REGION) -> Guest:
    g = await host.start_guest(name, "128M", touch=10, backend=backend)
    await g.wait_ready(timeout=120)
    assert g.record.accel == "kvm"
    assert b"kvm" in Path(f"/proc/{g.record.pid}/cmdline").read_bytes().split(b"\0")
    return g


async def _moved_ok(g: Guest, before_seq: int) -> None:
    later = await g.wait_heartbeat(before_seq, timeout=60)
    assert later is not None and later.ok and later.bad == 0
    st = await g.status()
    assert st.run_state == "running" and st.memory_ok is True and st.accel == "kvm"
    assert qemu_pids(str(g.host.settings.state_dir)) == [g.record.pid]


async def test_kvm_zero_copy_then_precopy_then_back(kvm_host: Host) -> None:
    """A KVM guest moves zero-copy (same frames, device state only), then by precopy (a
    copy: no shared frames), then zero-copy again, its memory good after each."""
    async with await _kvm_guest(kvm_host, "kz") as g:
        for mode in (MigrationMode.ZERO_COPY, MigrationMode.PRECOPY, MigrationMode.ZERO_COPY):
            hb = g.heartbeat()
            assert hb is not None and hb.ok
            old = g.record.pid
            res = await g.migrate(MigrationOptions(mode=mode))
            assert res.status == "completed" and res.guest_ok is True
            assert g.record.pid == res.dest_pid != old
            if mode is MigrationMode.ZERO_COPY:
                assert res.ram_transferred_bytes < MiB
                assert res.shared_frames_ratio is not None and res.shared_frames_ratio >= 0.99
                assert res.frames is not None and res.frames["present_both"] > 0
            else:
                assert res.ram_transferred_bytes > 10 * MiB  # at least what it touched
                assert res.shared_frames_ratio is None
            await _moved_ok(g, hb.seq)


async def test_kvm_cpr_transfer(kvm_host: Host) -> None:
    async with await _kvm_guest(kvm_host, "kc", RamBackend.MEMFD) as g:
        hb = g.heartbeat()
        assert hb is not None
        res = await g.migrate(MigrationOptions(mode=MigrationMode.CPR_TRANSFER))
        assert res.status == "completed" and res.guest_ok is True
        assert res.ram_transferred_bytes < MiB
        assert res.shared_frames_ratio is not None and res.shared_frames_ratio >= 0.99
        await _moved_ok(g, hb.seq)


async def test_kvm_guest_start_cli_says_kvm(kvm_runs: str, state_dir: Path) -> None:
    proc = run_cli(state_dir, "--accel", "kvm", "guest", "start", "kcli", "--memory", "64M",
                   "--touch", "5%", "--json", timeout=180)
    try:
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["accel"] == "kvm"
    finally:
        run_cli(state_dir, "guest", "stop", "kcli")
    assert qemu_pids(str(state_dir)) == []


async def test_kvm_auto_never_slower_than_tcg(kvm_runs: str, settings: Settings) -> None:
    """``auto`` picks KVM only with figures showing it clearly faster; the verdict is
    cached and the cached one is what guests get (no second probe compared to a first)."""
    qemu = settings.resolve_qemu()
    found = await verdict(qemu, settings.images_dir, settings.state_dir)
    assert found.tcg is not None and found.tcg.completed, found
    assert found.kvm is not None, found
    if found.guest == "kvm":
        assert found.kvm.completed and found.kvm.work_steps_per_s and found.tcg.work_steps_per_s
        assert found.kvm.work_steps_per_s >= MIN_WORK_RATIO * found.tcg.work_steps_per_s
        assert found.kvm.fill_pages_per_s and found.tcg.fill_pages_per_s
        assert found.kvm.fill_pages_per_s >= MIN_FILL_RATIO * found.tcg.fill_pages_per_s
    elif found.kvm.completed:
        assert found.kvm.fill_pages_per_s and found.tcg.fill_pages_per_s
        assert found.kvm.work_steps_per_s and found.tcg.work_steps_per_s
        assert (found.kvm.fill_pages_per_s < MIN_FILL_RATIO * found.tcg.fill_pages_per_s
                or found.kvm.work_steps_per_s < MIN_WORK_RATIO * found.tcg.work_steps_per_s)
    if kvm_runs == "kvm_pvm":
        # Measured here: first touch about 50x slower than TCG, and no Debian kernel boots.
        assert found.guest == "tcg" and found.cloud_vm == "tcg", found
    # What guests and cloud VMs get is the cached verdict, not a new race.
    assert await resolve_accel(Accel.AUTO, qemu, settings.images_dir,
                               settings.state_dir) == found.guest
    assert await resolve_accel(Accel.AUTO, qemu, settings.images_dir, settings.state_dir,
                               cloud_vm=True) == found.cloud_vm
    proc = run_cli(settings.state_dir, "--accel", "auto", "accel", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["guest"] == found.guest and out["probed_at"] == found.probed_at
    assert out["tcg"]["work_steps_per_s"] == found.tcg.work_steps_per_s


def _run(accel: str, fill: float, work: float) -> ProbeRun:
    return ProbeRun(accel, True, ready_s=1.0, boot_s=0.1, fill_pages_per_s=fill,
                    work_steps_per_s=work)


@pytest.mark.parametrize(("fill", "work", "flavour", "want"), [
    # The figures measured here (kvm_pvm): first touch ~0.02x TCG, loop ~1x.
    (2_700, 9e6, "kvm_pvm", ("tcg", "tcg")),
    (400_000, 5e8, "kvm_intel", ("kvm", "kvm")),    # hardware KVM: faster at both
    (400_000, 5e8, "kvm_pvm", ("kvm", "tcg")),       # a fast PVM: no Debian L1 kernel
    (400_000, 1.5e7, "kvm_amd", ("tcg", "tcg")),     # loop not twice as fast
    (50_000, 5e8, "kvm_amd", ("tcg", "tcg")),        # touches memory too slowly
])
def test_decide_kvm_rule(fill: float, work: float, flavour: str,
                         want: tuple[str, str]) -> None:
    tcg = _run("tcg", 180_000, 1e7)
    guest, why, cvm, cvm_why = decide(tcg, _run("kvm", fill, work), flavour)
    assert (guest, cvm) == want, (why, cvm_why)
    assert why and cvm_why


def test_decide_kvm_unfinished_or_missing() -> None:
    tcg = _run("tcg", 180_000, 1e7)
    assert decide(tcg, ProbeRun("kvm", False, error="not READY after 20 s"), "kvm_pvm")[0] \
        == "tcg"
    assert decide(tcg, None, "none")[:3:2] == ("tcg", "tcg")


async def test_auto_probes_once_for_concurrent_starts_in_one_command(settings: Settings,
                                                                     monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    """`lab up` boots its cloud VMs as tasks of one event loop, each asking for `auto`'s
    verdict on a fresh state dir: one probe runs and every task gets its verdict (the
    second task's flock used to block the loop the first task's probe awaited on)."""
    import asyncio

    from vmbeam_kvm import accel

    probes = []
    real = accel.probe

    async def counted(qemu: str, images_dir: Path) -> accel.AccelVerdict:
        probes.append(qemu)
        return await real(qemu, images_dir)

    monkeypatch.setattr(accel, "probe", counted)
    qemu = settings.resolve_qemu()
    got = await asyncio.wait_for(asyncio.gather(*(
        resolve_accel(Accel.AUTO, qemu, settings.images_dir, settings.state_dir,
                      cloud_vm=i % 2 == 0) for i in range(3))), timeout=120)
    assert len(probes) == 1 and set(got) <= {"tcg", "kvm"}
