"""Pure logic: units, the serial protocol parser, the store, region identity pages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmbeam_kvm import BadInputError, BeamRegion, DuplicateGuestError, RegionMismatchError
from vmbeam_kvm.heartbeat import read_status
from vmbeam_kvm.region import read_identity
from vmbeam_kvm.store import GuestRecord, GuestState, MigrationPhase, Store
from vmbeam_kvm.units import format_size, parse_percent, parse_size


def test_parse_size() -> None:
    assert parse_size("256M") == 256 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096
    for bad in ("", "12X", "-1G", "1.00001K"):
        with pytest.raises(BadInputError):
            parse_size(bad)
    assert format_size(1536 << 20) == "1536M"


def test_parse_percent() -> None:
    assert parse_percent("70%") == 70
    assert parse_percent("0") == 0
    for bad in ("96%", "x", "-5%"):
        with pytest.raises(BadInputError):
            parse_percent(bad)


def test_serial_protocol(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    assert read_status(log).heartbeat is None
    log.write_bytes(b"VMBEAM-TESTGUEST boot mem=1 touch=70 pages=2\nFILL 10%\n")
    st = read_status(log)
    assert st.booted and not st.ready and st.heartbeat is None
    log.write_bytes(log.read_bytes() + b"READY pages=2 fill_ms=3\n"
                    b"HB seq=7 round=1 cursor=5 bad=0 ok=1\nHB seq=8 round=1 cursor=9 bad=2 ok=0\n"
                    b"HB seq=9 round=1 cur")  # a torn last line is ignored
    st = read_status(log)
    assert st.ready and st.heartbeat is not None
    assert (st.heartbeat.seq, st.heartbeat.bad, st.heartbeat.ok) == (8, 2, False)


def test_region_identity_and_seals() -> None:
    with BeamRegion.create(1 << 20, "unit") as a, BeamRegion.create(1 << 20, "unit") as b:
        ident = read_identity(a.fd)
        assert ident == a.identity and ident.ram_size == 1 << 20 and ident.guest == "unit"
        a.verify(read_identity(a.fd))
        with pytest.raises(RegionMismatchError):
            a.verify(b.identity)
        with pytest.raises(PermissionError):
            os.ftruncate(a.fd, 1 << 21)  # sealed: the size is part of the identity
    with pytest.raises(BadInputError):
        BeamRegion.create(4097, "odd")


def test_store_roundtrip(tmp_path: Path) -> None:
    store = Store(tmp_path)
    rec = GuestRecord(name="a", image="test", memory=1 << 28, touch=70, accel="tcg",
                      qemu="/usr/bin/qemu-system-x86_64", state=GuestState.RUNNING, pid=5)
    store.add_guest(rec)
    with pytest.raises(DuplicateGuestError):
        store.add_guest(rec)
    assert store.get_guest("a").state is GuestState.RUNNING
    mid = store.begin_migration("a", "zero-copy", 5, 1)
    assert [m.id for m in store.unfinished_migrations()] == [mid]
    store.journal(mid, MigrationPhase.DONE, result={"x": 1})
    assert store.unfinished_migrations() == []
    with store.lock_guest("a"):
        assert store.guest_locked("a")
    assert not store.guest_locked("a")
    store.close()


def test_region_pow2_layout() -> None:
    with BeamRegion.create(256 << 20, "bar", pow2=True) as r:
        assert r.size == 512 << 20  # a PCI BAR must be a power of two
        assert read_identity(r.fd) == r.identity
        assert os.fstat(r.fd).st_blocks * 512 <= 8192  # the padding costs nothing


class _FakeSource:
    """The QMP answers of a source QEMU whose last migration (``query-migrate``) reads
    ``status``; ``outgoing`` = that was one it sent (QEMU adds the source-side times)."""

    def __init__(self, status: str, outgoing: bool, run_state: str = "postmigrate") -> None:
        self.migration: dict[str, object] = {"status": status}
        if outgoing:
            self.migration["total-time"] = 12
        self.run_state = run_state
        self.sent: list[str] = []

    async def execute(self, cmd: str, args: object) -> dict[str, object]:
        self.sent.append(cmd)
        if cmd == "cont":
            self.run_state = "running"
        return self.migration if cmd == "query-migrate" else {"status": self.run_state}


@pytest.mark.parametrize(("status", "outgoing", "started", "never_ran", "resumed"), [
    ("failed", True, True, False, True), ("cancelled", True, True, False, True),
    ("completed", True, True, False, False),  # handed over: the destination may have run
    ("completed", True, True, True, True),    # ...unless it was seen never to run
    # A source that itself arrived by migration reports that incoming one as completed:
    ("completed", False, True, False, True),
    # Before this run asked it to migrate, nothing it reports can be a handover of ours
    # (an earlier outgoing migration whose destination never ran, then resumed):
    ("completed", True, False, False, True),
], ids=lambda v: str(v))
async def test_resume_source_rule(status: str, outgoing: bool, started: bool,
                                  never_ran: bool, resumed: bool) -> None:
    from vmbeam_kvm import MigrationError
    from vmbeam_kvm.migrate.handover import resume_source
    src = _FakeSource(status, outgoing, "postmigrate" if started else "running")
    if resumed:
        await resume_source(src.execute, "g", switch_started=started, dest_never_ran=never_ran)
        assert src.run_state == "running"
    else:
        with pytest.raises(MigrationError):
            await resume_source(src.execute, "g", switch_started=started,
                                dest_never_ran=never_ran)
        assert "cont" not in src.sent


# The recovery decision table: every combination of what the two ends report and the
# journaled phase, against rows copied from vmbeam_kvm.migrate.recovery.decide's docstring
# (first match wins): (phases, source, destinations, verdict, switch_started, never_ran).
_BEFORE = ("share", "prepare")
_AFTER = ("switch", "confirm", "relocate")
_PENDING = ("source-pending",)
_ALL = _BEFORE + _AFTER + _PENDING
_NOT_RUNNING = ("incoming", "gone", "unknown")
_DECISION_ROWS: list[tuple[tuple[str, ...], tuple[bool | None, ...], tuple[str, ...], str,
                           bool, bool]] = [
    (_ALL, (True, False, None), ("running",), "destination kept", False, False),
    (_BEFORE + _PENDING, (None,), _NOT_RUNNING, "source pending", False, False),
    (_ALL, (True, False, None), ("unknown",), "needs action", False, False),
    (_AFTER, (None,), _NOT_RUNNING, "needs action", False, False),
    (_ALL, (False,), _NOT_RUNNING, "both copies gone", False, False),
    (_BEFORE, (True,), ("incoming",), "source resumed", False, True),
    (_AFTER, (True,), ("incoming",), "source resumed", True, True),
    (_BEFORE, (True,), ("gone",), "source resumed", False, False),
    (_PENDING, (True,), ("incoming", "gone"), "source resumed", True, True),
    (_AFTER, (True,), ("gone",), "source resumed", True, False),
]


@pytest.mark.parametrize("phase", _ALL)
@pytest.mark.parametrize("src_alive", [True, False, None], ids=["src-up", "src-gone", "src-?"])
@pytest.mark.parametrize("dest", ["running", "incoming", "gone", "unknown"])
def test_recovery_decision_table(phase: str, src_alive: bool | None, dest: str) -> None:
    from vmbeam_kvm.migrate.recovery import DestSeen, Verdict, decide
    d = decide(MigrationPhase(phase), src_alive, DestSeen(dest))
    row = next(r for r in _DECISION_ROWS
               if phase in r[0] and src_alive in r[1] and dest in r[2])
    assert d.verdict is Verdict(row[3])
    if d.verdict is Verdict.RESUME_SOURCE:
        # Only a run that reached the switch can have handed over; a destination seen
        # waiting for its stream (or dropped as such before source-pending) never ran.
        assert (d.switch_started, d.dest_never_ran) == (row[4], row[5])


# The settle table (vmbeam_kvm.migrate.settle.choose), rows from its docstring.
_RUNS, _UNPROVEN, _HALTED, _GONE, _UNKNOWN = (
    "runs, memory good", "runs, memory not proven", "not running", "gone", "unknown")
_SETTLE_ROWS: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    ((_UNKNOWN,), (_RUNS, _UNPROVEN, _HALTED, _GONE, _UNKNOWN), "refuse"),
    ((_RUNS, _UNPROVEN, _HALTED, _GONE), (_UNKNOWN,), "refuse"),
    ((_RUNS, _UNPROVEN), (_RUNS, _UNPROVEN), "refuse"),
    ((_RUNS,), (_HALTED, _GONE), "source"),
    ((_HALTED, _GONE), (_RUNS,), "destination"),
    ((_UNPROVEN,), (_HALTED, _GONE), "refuse"),
    ((_HALTED, _GONE), (_UNPROVEN,), "refuse"),
    ((_GONE,), (_GONE,), "lost"),
    ((_HALTED, _GONE), (_HALTED, _GONE), "refuse"),
]
_ENDS = (_RUNS, _UNPROVEN, _HALTED, _GONE, _UNKNOWN)


@pytest.mark.parametrize("src", _ENDS)
@pytest.mark.parametrize("dst", _ENDS)
def test_settle_table(src: str, dst: str) -> None:
    from vmbeam_kvm.migrate.settle import Choice, EndSeen, choose
    row = next(r for r in _SETTLE_ROWS if src in r[0] and dst in r[1])
    got = choose(EndSeen(src), EndSeen(dst))
    assert got.choice is Choice(row[2])
    assert (got.why != "") == (got.choice is Choice.REFUSE)  # a refusal says why


def test_agent_imports_without_l0_dependencies() -> None:
    """The agent runs in a cloud VM that has python3 and qemu.qmp but not pyroute2, click
    or cffi: importing it (and so the package's __init__) must not need them."""
    import subprocess
    import sys
    code = ("import sys\n"
            "for m in ('pyroute2', 'click', 'cffi', 'matplotlib'): sys.modules[m] = None\n"
            "import vmbeam_kvm.agent.server\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


async def test_tick_meter_reads_gaps_and_work() -> None:
    """The meter's logic on datagrams sent by hand: a gap is read between arrivals, work
    lines are parsed whatever datagrams they are split into, and junk is ignored."""
    import asyncio
    import socket
    import time

    from vmbeam_kvm.ticks import TickMeter, chardev_arg, tcp_backend

    with TickMeter() as meter, socket.create_connection(meter.endpoint) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.time()
        for i in range(40):
            if i % 10 == 9:
                for b in f"w{i * 100:x}\n".encode():
                    s.send(bytes([b]))
            else:
                s.send(b".")
            if i == 20:
                await asyncio.sleep(0.08)  # the "pause"
            else:
                await asyncio.sleep(0.002)
        s.send(b"wzz\n")  # not hex: no work point
        s.send(b"w" + b"1" * 40 + b"\n")  # too long: dropped
        assert await meter.wait_after(time.time() - 0.001, 2)
        gap = meter.longest_gap(t0, time.time())
        assert gap is not None and 0.075 <= gap[1] - gap[0] < 0.2
        assert [w for _, w in meter.work] == [900, 1900, 2900, 3900]
        rate = meter.rate(t0, time.time())
        assert rate is not None and rate > 0
        fig = meter.figures(t0 + 0.02, time.time(), 1.0)
        assert fig is not None and fig.pause_ms == round((gap[1] - gap[0]) * 1000, 3)
    assert chardev_arg(None) == "null,id=ticks"
    assert chardev_arg(("10.0.0.1", 5)) == \
        "socket,id=ticks,host=10.0.0.1,port=5,server=off,nodelay=on,reconnect-ms=1000"
    assert tcp_backend("h", 7)["data"]["addr"]["data"] == {"host": "h", "port": "7"}
