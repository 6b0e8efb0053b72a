"""The pause a guest really sees (its ticks, timestamped on L0), for every local method.

The instrument is validated first: a deliberate stop/cont of a known length must read as
that length. Then every method reports ``pause_ms`` (and, asked for, the work-rate tail);
a stop injected right after the switch can only lengthen the pause, never hide it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from vmbeam_kvm import Guest, Host, MigrationMode, MigrationOptions
from vmbeam_kvm.migrate.faults import injected
from vmbeam_kvm.qemu.machine import RamBackend
from vmbeam_kvm.ticks import CHARDEV_ID, TickMeter, null_backend, tcp_backend

STOP_S = 0.050
TICK_MS = 1.0


async def _stop_for(qmp: Any, seconds: float) -> tuple[float, float]:
    """Stop the VM for ``seconds``; returns the shortest and the longest it can have been
    stopped, from the QMP calls' own times (wall clock)."""
    t0 = time.time()
    await qmp("stop")
    t1 = time.time()
    await asyncio.sleep(seconds)
    t2 = time.time()
    await qmp("cont")
    t3 = time.time()
    return t2 - t1, t3 - t0


async def test_a_deliberate_stop_reads_as_its_length(guest: Guest) -> None:
    with TickMeter() as meter:
        await guest.qmp("chardev-change", {"id": CHARDEV_ID,
                                           "backend": tcp_backend(*meter.endpoint)})
        assert await meter.wait_after(time.time() + 0.3, 10)  # ticks flow
        readings = []
        for _ in range(5):
            start = time.time()
            inner, outer = await _stop_for(guest.qmp, STOP_S)
            assert await meter.wait_after(time.time() + 0.05, 5)
            gap = meter.longest_gap(start, time.time())
            assert gap is not None
            pause = (gap[1] - gap[0]) * 1000
            readings.append(pause)
            # Never shorter than the VM was surely stopped, never longer than it can have
            # been (plus one tick period: the next tick is due up to 1 ms after cont).
            assert inner * 1000 - 0.5 <= pause <= outer * 1000 + TICK_MS + 0.5, \
                (inner, outer, pause)
            # The yardstick: 50 ms reads 50 ± 5 ms (the sleep's own overshoot
            # counts against it, so compare with what was actually slept).
            assert abs(pause - inner * 1000) <= 5, (inner, pause)
            await asyncio.sleep(0.1)
        # Between stops the ticks are ~1 ms apart: the resolution the pause is read at.
        t = time.time()
        await asyncio.sleep(0.3)
        gap = meter.longest_gap(t, t + 0.3)
        assert gap is not None and (gap[1] - gap[0]) * 1000 < 20
        work = meter.rate(t - 0.5, t + 0.3)
        assert work is not None and work > 0
        await guest.qmp("chardev-change", {"id": CHARDEV_ID, "backend": null_backend()})
    res = await guest.migrate(MigrationOptions())
    assert res.guest_ok and res.pause_ms is not None


async def _check(res: Any, tail: bool) -> None:
    assert res.status == "completed" and res.guest_ok is True
    assert res.pause_ms is not None and res.pause_ms > 0
    if tail:
        assert res.post_switch_slowdown is not None and res.post_switch_slowdown > 0
    else:
        assert res.post_switch_slowdown is None
    if res.mode == MigrationMode.PRECOPY.value:
        assert res.shared_frames_ratio is None
    else:
        assert res.shared_frames_ratio == 1.0


async def test_every_method_reports_the_pause(host: Host) -> None:
    async with await host.start_guest("p1", "256M", touch=70) as g:
        await g.wait_ready(timeout=60)
        # Fresh, then moved before, then moved back after a precopy: every history.
        for mode, tail in ((MigrationMode.ZERO_COPY, True), (MigrationMode.PRECOPY, True),
                           (MigrationMode.ZERO_COPY, False)):
            await _check(await g.migrate(MigrationOptions(mode=mode, tail_window=0.3)
                                         if tail else MigrationOptions(mode=mode)), tail)
    async with await host.start_guest("p2", "256M", backend=RamBackend.MEMFD) as g:
        await g.wait_ready(timeout=60)
        res = await g.migrate(MigrationOptions(mode=MigrationMode.CPR_TRANSFER,
                                               tail_window=0.3))
        await _check(res, True)


async def test_an_injected_stop_is_never_hidden(guest: Guest) -> None:
    """The destination is stopped for 50 ms right after it took over: the guest saw at
    least that, whatever QEMU's downtime says."""
    async def hold(dst: Any) -> None:
        await _stop_for(dst.execute, STOP_S)

    for _ in range(2):  # fresh and moved before
        with injected(after_switch=hold):
            res = await guest.migrate(MigrationOptions())
        assert res.guest_ok and res.pause_ms is not None
        assert res.pause_ms >= STOP_S * 1000, res.pause_ms
    res = await guest.migrate(MigrationOptions())  # and it still moves
    assert res.guest_ok and res.pause_ms is not None and res.pause_ms < 1000


async def test_measuring_is_undone(guest: Guest) -> None:
    """After a move (and after a refused one) no QEMU keeps sending ticks anywhere."""
    res = await guest.migrate(MigrationOptions())
    assert res.pause_ms is not None
    chardevs = await guest.qmp("query-chardev")
    tick = [c for c in chardevs if c["label"] == CHARDEV_ID]
    assert len(tick) == 1 and tick[0]["filename"] == "null"
    # A meter that goes away (the command measuring died) leaves QEMU as it was: it drops
    # the guest's ticks, answers QMP, and the guest runs and moves on.
    meter = TickMeter()
    await guest.qmp("chardev-change", {"id": CHARDEV_ID,
                                       "backend": tcp_backend(*meter.endpoint)})
    assert await meter.wait_after(time.time() + 0.05, 10)
    meter.close()
    hb = guest.heartbeat()
    assert hb is not None
    for _ in range(20):
        assert (await guest.qmp("query-status"))["running"] is True
        await asyncio.sleep(0.05)
    later = await guest.wait_heartbeat(hb.seq, timeout=30)
    assert later is not None and later.ok
    res = await guest.migrate(MigrationOptions())
    assert res.guest_ok and res.pause_ms is not None
