"""Interrupted commands leave nothing half-made (issue 15, finding 4; DESIGN pitfall 25).

Each test runs the real CLI as a subprocess on real QEMU, signals it at one point of its work
(a delay, or an event: "its QEMU appeared", "the move journaled phase X") and then looks at
what is left — QEMU processes of the state directory, unix sockets listening under it, memfds
of its guests, its lab namespace — right after the command exits and again after the stop
command. SIGINT goes to the command's process group (as Ctrl-C does), SIGTERM to the command
alone (as ``timeout`` does). SIGKILL, which no program can clean up after, must leave what
the stop commands find and stop: a QEMU is found by its pidfile, not by a recorded pid.
Where a guest survives (an interrupted move), it runs with a good memory verdict and moves
again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmbeam_kvm.store import GuestRecord, GuestState, Store

from .conftest import CLI, REPO, qemu_pids, run_cli

GUEST = ("--memory", "128M", "--touch", "10%")
# A namespace and subnet of this module's own (cloud-VM tests build their lab network).
LAB_ENV = {"VMBEAM_LAB_NS": f"vbt-int-{os.getpid()}", "VMBEAM_LAB_SUBNET": "10.231.19.0/24"}

Point = float | Callable[[], bool]


def spawn(state: Path, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.Popen[str]:
    full_env = {**os.environ, "VMBEAM_STATE_DIR": str(state), "VMBEAM_ACCEL": "tcg",
                **(env or {})}
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env, cwd=REPO, start_new_session=True)


def wait_until(pred: Callable[[], bool], timeout: float = 90.0, poll: float = 0.003) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "the point to signal at never came"
        time.sleep(poll)


def send(proc: subprocess.Popen[str], sig: int) -> None:
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the whole process group
    else:
        os.kill(proc.pid, sig)


def interrupt(proc: subprocess.Popen[str], sig: int, at: Point, *, then: tuple[int, ...] = (),
              timeout: float = 120.0, may_finish: bool = False) -> tuple[int, str, str]:
    """Signal ``proc`` at ``at`` (seconds after the start, or once ``at()`` holds), then each
    of ``then`` 20 ms apart (signals during the cleanup); its exit status and output."""
    t0 = time.monotonic()
    if callable(at):
        wait_until(lambda: at() or proc.poll() is not None)
    else:
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
    landed = proc.poll() is None
    if landed:
        send(proc, sig)
    for extra in then:
        time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            send(proc, extra)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the command did not end within {timeout:.0f} s of the signal: {err}")
    assert landed or may_finish, f"the command ended before the signal: {err}"
    return proc.returncode, out, err


def qemu_appeared(state: Path, n: int = 1) -> Callable[[], bool]:
    return lambda: len(qemu_pids(str(state))) >= n


def phase_reached(state: Path, phases: tuple[str, ...]) -> Callable[[], bool]:
    """The newest move journals one of ``phases`` (or a later end)."""
    def reached() -> bool:
        try:
            db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True, timeout=1)
            try:
                row = db.execute("SELECT phase FROM migrations ORDER BY id DESC LIMIT 1"
                                 ).fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            return False
        return row is not None and row[0] in phases
    return reached


def rows(state: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the store as it is, without opening a Host (which would settle things); no
    store yet reads as empty."""
    if not (state / "state.db").exists():
        return []
    db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def listening_under(state: Path) -> list[str]:
    """Unix sockets bound to paths under ``state`` that some process still holds."""
    with open("/proc/net/unix") as f:
        return [line.split()[-1] for line in f
                if line.split()[-1].startswith(str(state))]


def memfds_of(guests: list[str]) -> list[str]:
    """Beam regions (memfds) of these guests that some process still holds."""
    names = {f"/memfd:vmbeam-{g}" for g in guests}
    held = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.split(" (deleted)")[0] in names:
                        held.append(f"{pid}:{target}")
    return held


def netns_exists(ns: str) -> bool:
    return Path("/run/netns", ns).exists()


def assert_nothing_left(state: Path, guests: list[str], ns: str | None = None) -> None:
    assert qemu_pids(str(state)) == [], "QEMU processes left behind"
    assert listening_under(state) == [], "sockets left behind"
    assert memfds_of(guests) == [], "regions left behind"
    assert not [p for p in Path("/dev/shm").iterdir() if "vmbeam" in p.name]
    if ns is not None:
        assert not netns_exists(ns), f"namespace {ns} left behind"


def cli_json(state: Path, *args: str, rc: int = 0, env: dict[str, str] | None = None
             ) -> Any:
    proc = run_cli(state, *args, "--json", env=env)
    assert proc.returncode == rc, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def reaper(state_dir: Path) -> Iterator[None]:
    """Whatever a failed test left: killed (a leaked TCG QEMU slows every later test)."""
    yield
    for pid in qemu_pids(str(state_dir)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------- guest start
@pytest.mark.parametrize(("sig", "at"), [
    (signal.SIGTERM, 0.17), (signal.SIGTERM, "qemu"), (signal.SIGINT, "qemu")],
    ids=["TERM-0.17s", "TERM-qemu-appeared", "INT-qemu-appeared"])
def test_guest_start_interrupted(state_dir: Path, reaper: None, sig: int, at: Any) -> None:
    proc = spawn(state_dir, "guest", "start", "g1", *GUEST)
    # The last one: the stop of the bench's first guest, cut short, left its record behind.
    # (5.5 s in, once: on a fast host that was this same moment.) Mid-move, the cleanup
    # (the move settled, the guest stopped) is still running when the next signals land.
    point = (qemu_appeared(state_dir) if at == "qemu" else
             moves_done(state_dir, 4) if at == "last-move" else
             phase_reached(state_dir, ("prepare", "switch")) if at == "mid-move" else at)
    rc, _, err = interrupt(proc, sig, point)
    if rc == -sig:
        # Killed by the default action, before the command installed its handlers (still
        # importing): it had made nothing yet. Only a delay can land there.
        assert not callable(point)
    else:
        assert rc == 128 + sig, err
        assert "cleaning up" in err and "Traceback" not in err
    # Undone by the command itself, before any other command looks.
    assert rows(state_dir, "SELECT name FROM guests") == []
    assert_nothing_left(state_dir, ["g1"])
    assert cli_json(state_dir, "guest", "list") == []
    # The name is free: a start goes through and the stop leaves nothing.
    cli_json(state_dir, "guest", "start", "g1", *GUEST)
    cli_json(state_dir, "guest", "stop", "g1")
    assert_nothing_left(state_dir, ["g1"])


@pytest.mark.parametrize("pid_recorded", [True, False], ids=["pid-recorded", "pid-0"])
def test_guest_start_killed_then_stopped(state_dir: Path, reaper: None,
                                         pid_recorded: bool) -> None:
    """SIGKILL leaves a ``starting`` record: list and status answer, and ``guest stop``
    stops the QEMU that runs, also where the record names no pid (as a start killed
    between launching QEMU and recording it leaves it)."""
    proc = spawn(state_dir, "guest", "start", "g1", *GUEST)
    interrupt(proc, signal.SIGKILL, qemu_appeared(state_dir), timeout=30)
    assert len(qemu_pids(str(state_dir))) == 1
    if not pid_recorded:
        with sqlite3.connect(state_dir / "state.db") as db:
            db.execute("UPDATE guests SET pid=0, pid_start=0, state='starting'")
    listed = cli_json(state_dir, "guest", "list")
    assert [g["name"] for g in listed] == ["g1"]
    cli_json(state_dir, "guest", "status", "g1")
    assert cli_json(state_dir, "guest", "stop", "g1")["status"] == "stopped"
    assert_nothing_left(state_dir, ["g1"])


def test_lab_down_stops_qemus_no_record_names(state_dir: Path, reaper: None) -> None:
    """A QEMU whose record is gone (a command died between removing the record and its
    QEMU) is still this state dir's: ``lab down`` stops it."""
    proc = spawn(state_dir, "guest", "start", "g1", *GUEST)
    interrupt(proc, signal.SIGKILL, qemu_appeared(state_dir), timeout=30)
    with sqlite3.connect(state_dir / "state.db") as db:
        db.execute("DELETE FROM guests")
    assert len(qemu_pids(str(state_dir))) == 1
    cli_json(state_dir, "lab", "down", env=LAB_ENV)
    assert_nothing_left(state_dir, ["g1"])


def test_stop_kills_only_what_names_its_pidfile(state_dir: Path) -> None:
    """A recycled pid is never killed: a record and a stale pidfile that point at another
    process, and a process that names another state dir's pidfile, all survive the stop."""
    store = Store(state_dir)
    d = store.guest_dir("g1")
    sleeper = subprocess.Popen(["sleep", "60"])
    elsewhere = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                  "-pidfile", f"{state_dir}-other/guests/g1/qmp-0.pid"])
    try:
        (d / "qmp-0.pid").write_text(f"{sleeper.pid}\n")
        store.add_guest(GuestRecord(
            name="g1", image="test", memory=128 << 20, touch=10, accel="tcg", qemu="qemu",
            state=GuestState.STARTING, pid=sleeper.pid, pid_start=1,
            qmp_path=str(d / "qmp-0.sock"), serial_path=str(d / "serial-0.log"),
            log_path=str(d / "qemu-0.log")))
        store.close()
        cli_json(state_dir, "guest", "stop", "g1")
        assert sleeper.poll() is None and elsewhere.poll() is None
    finally:
        sleeper.kill()
        elsewhere.kill()
        sleeper.wait()
        elsewhere.wait()


def test_list_and_status_answer_in_every_state(state_dir: Path) -> None:
    """``guest list`` / ``guest status`` never crash on a record, whatever its state and
    whether its QEMU (or its cloud VM) is there."""
    store = Store(state_dir)
    names = []
    for i, state in enumerate(GuestState):
        for pid, cloud_vm in ((0, ""), (os.getpid(), ""), (0, "nowhere")):
            name = f"g{i}-{pid and 'pid'}-{cloud_vm or 'here'}"
            d = store.guest_dir(name)
            store.add_guest(GuestRecord(
                name=name, image="test", memory=128 << 20, touch=10, accel="tcg",
                qemu="qemu", state=state, pid=pid, pid_start=1, cloud_vm=cloud_vm,
                qmp_path=str(d / "qmp-0.sock"), serial_path=str(d / "serial-0.log"),
                log_path=str(d / "qemu-0.log")))
            names.append(name)
    store.close()
    listed = cli_json(state_dir, "guest", "list")
    assert sorted(g["name"] for g in listed) == sorted(names)
    for name in names:
        assert cli_json(state_dir, "guest", "status", name)["name"] == name


# ---------------------------------------------------------------------------- bench flat
def moves_done(state: Path, n: int) -> Callable[[], bool]:
    """``n`` moves have ended (the bench is stopping its guest next)."""
    def done() -> bool:
        try:
            return len(rows(state, "SELECT id FROM migrations WHERE phase='done'")) >= n
        except sqlite3.Error:  # the store is being created
            return False
    return done


@pytest.mark.parametrize(("at", "then"), [
    (1.0, ()), ("qemu", ()), (3.0, ()), ("mid-move", (signal.SIGINT, signal.SIGTERM)),
    ("last-move", (signal.SIGINT, signal.SIGTERM))],
    ids=["1.0s", "qemu-appeared", "3.0s", "mid-move-then-INT-TERM",
         "guest-stopping-then-INT-TERM"])
def test_bench_flat_interrupted(state_dir: Path, reaper: None, at: Any,
                                then: tuple[int, ...]) -> None:
    """Ctrl-C ends the bench at once with nothing left (it hung, or printed ``Aborted!``
    and left a ``bench-*`` QEMU with no record); more signals during the cleanup do not
    cut it short."""
    proc = spawn(state_dir, "bench", "flat", "--sizes", "128M", "--repeat", "2", "--touch",
                 "10%")
    # The last one: the stop of the bench's first guest, cut short, left its record behind.
    # (5.5 s in, once: on a fast host that was this same moment.) Mid-move, the cleanup
    # (the move settled, the guest stopped) is still running when the next signals land.
    point = (qemu_appeared(state_dir) if at == "qemu" else
             moves_done(state_dir, 4) if at == "last-move" else
             phase_reached(state_dir, ("prepare", "switch")) if at == "mid-move" else at)
    rc, _, err = interrupt(proc, signal.SIGINT, point, then=then, timeout=60)
    assert rc == 130, err
    assert "Aborted!" not in err and "Traceback" not in err
    if at == "mid-move":
        assert "still cleaning up" in err
    assert rows(state_dir, "SELECT name FROM guests") == [], err
    assert_nothing_left(state_dir, ["bench-128M-region", "bench-128M-memfd"])


# ------------------------------------------------------------------------ migrate --local
@pytest.fixture(scope="module")
def mover() -> Iterator[Path]:
    """One running guest that every interrupted move of this module works on."""
    state = Path(tempfile.mkdtemp(prefix="vbt-", dir="/tmp"))
    try:
        cli_json(state, "guest", "start", "m1", *GUEST)
        yield state
        cli_json(state, "guest", "stop", "m1")
        assert_nothing_left(state, ["m1"])
    finally:
        for pid in qemu_pids(str(state)):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(state, ignore_errors=True)


MOVE_POINTS = [
    ("zero-copy", signal.SIGTERM, ("prepare",), False),
    ("zero-copy", signal.SIGINT, "dest", False),
    ("precopy", signal.SIGTERM, ("switch",), False),
    ("zero-copy", signal.SIGTERM, ("confirm", "relocate", "done"), True),
]


@pytest.mark.parametrize(("mode", "sig", "at", "may_finish"), MOVE_POINTS,
                         ids=["zero-copy-TERM-prepare", "zero-copy-INT-dest-appeared",
                              "precopy-TERM-switch", "zero-copy-TERM-confirm"])
def test_migrate_interrupted(mover: Path, mode: str, sig: int, at: Any,
                             may_finish: bool) -> None:
    """An interrupted move is settled by the command itself: one QEMU runs the guest, the
    journal is closed and the record says running — before any other command looks; the
    guest's memory is good and it moves again."""
    state = mover
    point = qemu_appeared(state, 2) if at == "dest" else phase_reached(state, at)
    proc = spawn(state, "migrate", "m1", "--local", "--mode", mode)
    rc, _, err = interrupt(proc, sig, point, may_finish=may_finish)
    # A move that finished before the signal landed exits 0, or is killed by the default
    # action once the command's loop (and its handlers) are gone: done, not half-made.
    assert rc in ((0, -sig, 128 + sig) if may_finish else (128 + sig,)), err
    assert "Traceback" not in err
    # As the command left it (no Host opened since, which would settle it).
    (pid, rec_state), = rows(state, "SELECT pid, state FROM guests WHERE name='m1'")
    assert rec_state == "running"
    assert rows(state, "SELECT id FROM migrations WHERE phase NOT IN ('done', 'failed')"
                ) == []
    assert qemu_pids(str(state)) == [pid]
    st = cli_json(state, "guest", "status", "m1")
    assert st["state"] == "running" and st["alive"] and st["pid"] == pid
    seq = st["heartbeat"]["seq"]
    wait_until(lambda: cli_json(state, "guest", "status", "m1")["heartbeat"]["seq"] > seq,
               timeout=30, poll=0.2)
    assert cli_json(state, "guest", "status", "m1")["memory_ok"] is True
    res = cli_json(state, "migrate", "m1", "--local", "--mode", "zero-copy")
    assert res["status"] == "completed" and res["guest_ok"] is True
    assert qemu_pids(str(state)) == [res["dest_pid"]]


# ---------------------------------------------------------------- cloud VMs and the lab
@pytest.fixture
def lab_state(state_dir: Path) -> Iterator[Path]:
    """A state dir whose lab network (this module's namespace) is taken down afterwards."""
    yield state_dir
    down = run_cli(state_dir, "lab", "down", env=LAB_ENV)
    for pid in qemu_pids(str(state_dir)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if netns_exists(LAB_ENV["VMBEAM_LAB_NS"]):
        subprocess.run(["ip", "netns", "del", LAB_ENV["VMBEAM_LAB_NS"]], check=False)
    assert down.returncode == 0, down.stderr


def taps(ns: str) -> list[str]:
    if not netns_exists(ns):
        return []
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True,
                         text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
            if "tap-" in line]


@pytest.mark.parametrize(("sig", "at"), [
    (signal.SIGTERM, 3.0), (signal.SIGTERM, "qemu"), (signal.SIGKILL, "qemu")],
    ids=["TERM-3s", "TERM-qemu-appeared", "KILL-qemu-appeared"])
def test_cloud_vm_start_interrupted(lab_state: Path, sig: int, at: Any) -> None:
    """``timeout -s TERM 3 cloud-vm start cx; cloud-vm stop cx`` left the cloud VM's QEMU
    running (the record said ``starting``, pid 0, and the stop said ``stopped``)."""
    state, ns = lab_state, LAB_ENV["VMBEAM_LAB_NS"]
    proc = spawn(state, "cloud-vm", "start", "cx", "--tenant", "t", "--memory", "512M",
                 env=LAB_ENV)
    point = qemu_appeared(state) if at == "qemu" else at
    rc, _, err = interrupt(proc, sig, point)
    if sig == signal.SIGKILL:
        assert len(qemu_pids(str(state))) == 1
        with sqlite3.connect(state / "state.db") as db:  # as a restart-once left it
            db.execute("UPDATE cloud_vms SET pid=0, pid_start=0")
        assert cli_json(state, "cloud-vm", "stop", "cx", env=LAB_ENV)["status"] == "stopped"
    else:
        assert rc == 128 + sig, err
        assert "cleaning up" in err and "Traceback" not in err
        assert rows(state, "SELECT name FROM cloud_vms") == []
        assert_nothing_left(state, [])
        # Nothing to stop: it is not there.
        assert run_cli(state, "cloud-vm", "stop", "cx", env=LAB_ENV).returncode == 2
    assert_nothing_left(state, [])
    assert taps(ns) == []
    assert cli_json(state, "cloud-vm", "list", env=LAB_ENV) == []


@pytest.mark.parametrize("at", [2.0, "three", 9.0], ids=["2s", "three-qemus-appeared", "9s"])
def test_lab_up_interrupted(lab_state: Path, at: Any) -> None:
    """``lab up`` SIGTERM'd left all three cloud-VM QEMUs running, and ``lab down`` then
    said it was down."""
    state, ns = lab_state, LAB_ENV["VMBEAM_LAB_NS"]
    proc = spawn(state, "lab", "up", env=LAB_ENV)
    point = qemu_appeared(state, 3) if at == "three" else at
    rc, _, err = interrupt(proc, signal.SIGTERM, point)
    assert rc == 143, err
    assert "Traceback" not in err
    assert rows(state, "SELECT name FROM cloud_vms") == []
    assert_nothing_left(state, [], ns)
    assert cli_json(state, "lab", "down", env=LAB_ENV)["status"] == "down"
    assert_nothing_left(state, [], ns)
