"""The vmbeam-kvm command line: JSON shapes, exit codes, bad input, crash recovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmbeam_kvm.store import Store

from .conftest import qemu_pids, run_cli

MIGRATE_FIELDS = {"guest", "mode", "status", "total_ms", "downtime_ms", "ram_transferred_bytes",
                  "shared_frames_ratio", "guest_ok"}


def cli_json(state_dir: Path, *args: str, rc: int = 0, **kw: object) -> object:
    proc = run_cli(state_dir, *args, "--json", **kw)  # type: ignore[arg-type]
    assert proc.returncode == rc, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def cli_guest(state_dir: Path) -> object:
    st = cli_json(state_dir, "guest", "start", "c1", "--memory", "256M", "--touch", "70%")
    yield st
    run_cli(state_dir, "guest", "stop", "c1")
    assert qemu_pids(str(state_dir)) == []


def test_guest_lifecycle_and_json(state_dir: Path, cli_guest: dict) -> None:  # type: ignore[type-arg]
    assert cli_guest["name"] == "c1" and cli_guest["state"] == "running"
    assert cli_guest["memory_bytes"] == 256 << 20 and cli_guest["accel"] == "tcg"
    # A later invocation finds the guest again from the state store.
    listing = cli_json(state_dir, "guest", "list")
    assert isinstance(listing, list) and [g["name"] for g in listing] == ["c1"]
    st = cli_json(state_dir, "guest", "status", "c1")
    assert isinstance(st, dict)
    assert st["run_state"] == "running" and st["memory_ok"] is True
    assert st["heartbeat"]["seq"] >= 1
    human = run_cli(state_dir, "guest", "status", "c1")
    assert "memory verdict good" in human.stdout


def test_migrate_json(state_dir: Path, cli_guest: dict) -> None:  # type: ignore[type-arg]
    res = cli_json(state_dir, "migrate", "c1", "--local", "--mode", "zero-copy")
    assert isinstance(res, dict) and set(res) >= MIGRATE_FIELDS
    assert res["status"] == "completed" and res["guest_ok"] is True
    assert res["ram_transferred_bytes"] < 1 << 20 and res["shared_frames_ratio"] >= 0.99
    pre = cli_json(state_dir, "migrate", "c1", "--local", "--mode", "precopy")
    assert isinstance(pre, dict)
    assert pre["shared_frames_ratio"] is None and pre["ram_transferred_bytes"] > 100 << 20
    assert pre["mode_reason"] == "requested"
    auto = cli_json(state_dir, "migrate", "c1", "--local")  # --mode auto, resolved honestly
    assert isinstance(auto, dict) and auto["mode"] == "zero-copy"
    assert auto["mode_reason"].startswith("auto: ") and auto["guest_ok"] is True
    assert len(qemu_pids(str(state_dir))) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["guest", "start", "x", "--memory", "100000001"], "multiple of the page size"),
    (["guest", "start", "x", "--memory", "4T"], "exceeds the host's available memory"),
    (["guest", "start", "x", "--memory", "256M", "--qemu", "/no/such/qemu"], "not found"),
    (["guest", "start", "bad/name", "--memory", "256M"], "invalid name"),
    (["guest", "start", "x", "--memory", "lots"], "invalid size"),
    (["guest", "status", "ghost"], "no guest named"),
    (["guest", "stop", "ghost"], "no guest named"),
    (["guest", "settle", "ghost"], "no guest named"),
    (["migrate", "ghost", "--local"], "no guest named"),
])
def test_bad_input(state_dir: Path, args: list[str], message: str) -> None:
    proc = run_cli(state_dir, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert qemu_pids(str(state_dir)) == []
    listing = cli_json(state_dir, "guest", "list")
    assert listing == []  # nothing was recorded


def test_duplicate_and_busy(state_dir: Path, cli_guest: dict) -> None:  # type: ignore[type-arg]
    proc = run_cli(state_dir, "guest", "start", "c1", "--memory", "256M", "--json")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert json.loads(proc.stdout)["exit_code"] == 2
    pid = cli_guest["pid"]
    store = Store(state_dir)
    try:
        with store.lock_guest("c1"):  # as if another command were migrating it
            proc = run_cli(state_dir, "migrate", "c1", "--local")
            assert proc.returncode == 2 and "busy" in proc.stderr
    finally:
        store.close()
    assert qemu_pids(str(state_dir)) == [pid]
    proc = run_cli(state_dir, "migrate", "c1")
    assert proc.returncode == 2 and "--local" in proc.stderr


def test_crash_after_switch_keeps_destination(state_dir: Path,
                                              cli_guest: dict) -> None:  # type: ignore[type-arg]
    src = cli_guest["pid"]
    proc = run_cli(state_dir, "migrate", "c1", "--local",
                   env={"VMBEAM_TEST_CRASH_AFTER": "switch"})
    assert proc.returncode == 99  # died mid-migration, journal says "switch"
    st = cli_json(state_dir, "guest", "status", "c1")  # the next invocation resolves it
    assert isinstance(st, dict)
    assert st["state"] == "running" and st["pid"] != src and st["run_state"] == "running"
    assert qemu_pids(str(state_dir)) == [st["pid"]]
    assert cli_json(state_dir, "migrate", "c1", "--local")["guest_ok"] is True  # type: ignore[index]


def test_crash_after_prepare_resumes_source(state_dir: Path,
                                            cli_guest: dict) -> None:  # type: ignore[type-arg]
    src = cli_guest["pid"]
    proc = run_cli(state_dir, "migrate", "c1", "--local",
                   env={"VMBEAM_TEST_CRASH_AFTER": "prepare"})
    assert proc.returncode == 99
    st = cli_json(state_dir, "guest", "status", "c1")
    assert isinstance(st, dict)
    assert st["state"] == "running" and st["pid"] == src and st["memory_ok"] is True
    assert qemu_pids(str(state_dir)) == [src]


def test_bench_flat_json(state_dir: Path, tmp_path: Path) -> None:
    plot = tmp_path / "bench.png"
    rows = cli_json(state_dir, "bench", "flat", "--sizes", "128M", "--repeat", "2",
                    "--plot", str(plot))
    assert isinstance(rows, list)
    assert [r["method"] for r in rows] == ["zero-copy", "precopy", "cpr-transfer"]
    for row in rows:
        assert row["memory_bytes"] == 128 << 20 and row["repeats"] == 2 and row["guest_ok"]
        assert row["statistics_over"] == 1  # the first move is reported apart
        for fig in ("total_ms", "downtime_ms", "pause_ms", "post_switch_slowdown",
                    "command_ms", "ram_transferred_bytes", "peak_qemu_memory_bytes",
                    "qemu_cpu_seconds"):
            assert set(row[fig]) == {"min", "median", "max"}
            assert row[fig]["min"] <= row[fig]["median"] <= row[fig]["max"]
        first = row["first_move"]
        assert first["total_ms"] == row["first_move_ms"] > 0
        assert first["pause_ms"] == row["first_move_pause_ms"] > 0
        assert first["post_switch_slowdown"] > 0
        assert row["pause_ms"]["min"] > 0
    zc, pre, _cpr = rows
    assert pre["shared_frames_ratio"] is None and zc["shared_frames_ratio"]["min"] >= 0.99
    assert pre["ram_transferred_bytes"]["min"] > 50 * zc["ram_transferred_bytes"]["max"]
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert qemu_pids(str(state_dir)) == []


def test_bench_flat_by_vcpus_and_disk(state_dir: Path) -> None:
    """--cpus and --disk-size: a row per vCPU count and disk size; zero-copy copies no byte
    of the disk, precopy what was written into it (--disk-fill), and nothing is left."""
    rows = cli_json(state_dir, "bench", "flat", "--sizes", "64M", "--repeat", "1",
                    "--methods", "zero-copy,precopy", "--cpus", "1,2", "--disk-size", "0,64M",
                    "--disk-fill", "50%")
    assert isinstance(rows, list)
    got = [(r["method"], r["cpus"], r["disk_size_bytes"]) for r in rows]
    assert sorted(got) == sorted((m, c, d) for m in ("zero-copy", "precopy") for c in (1, 2)
                                 for d in (0, 64 << 20))
    for r in rows:
        assert r["guest_ok"] and not r["failures"], r
        copied = r["disk_bytes_copied"]["max"]
        if r["method"] == "zero-copy" or not r["disk_size_bytes"]:
            assert copied == 0, r
        else:
            # The half written (two 16 MiB chunks), not the holes.
            assert 32 << 20 <= copied < 40 << 20, r
    assert qemu_pids(str(state_dir)) == []
    assert not list((state_dir / "bench-disks").glob("*"))


def test_list_and_status_of_a_starting_record(state_dir: Path) -> None:
    """A record still `starting` (pid 0, no serial log yet: another command is starting
    it) is listed and shown, never a crash (it was IsADirectoryError on Path(""))."""
    from vmbeam_kvm.store import GuestRecord, GuestState
    store = Store(state_dir)
    try:
        store.add_guest(GuestRecord(name="st0", image="test", memory=64 << 20, touch=10,
                                    accel="tcg", qemu="qemu-system-x86_64",
                                    state=GuestState.STARTING))
    finally:
        store.close()
    listing = cli_json(state_dir, "guest", "list")
    assert isinstance(listing, list) and [g["state"] for g in listing] == ["starting"]
    st = cli_json(state_dir, "guest", "status", "st0")
    assert isinstance(st, dict) and st["heartbeat"] is None and st["alive"] is False
    human = run_cli(state_dir, "guest", "list")
    assert human.returncode == 0 and "starting" in human.stdout, human.stderr


async def test_status_does_not_wait_for_a_busy_guest(state_dir: Path,
                                                     cli_guest: dict) -> None:  # type: ignore[type-arg]
    """While another command holds the guest (a move does: its lock and the QEMU's one QMP
    session), `guest list`/`status` answer from the record, marked busy, at once."""
    from vmbeam_kvm import Host, Settings
    from vmbeam_kvm.config import Accel
    async with Host(Settings(state_dir=state_dir, accel=Accel.TCG)) as host:
        rec = host.store.get_guest("c1")
        await host.process(rec).execute("query-status")  # we hold its QMP session now
        with host.store.lock_guest("c1"):
            listing = cli_json(state_dir, "guest", "list", timeout=30)
            st = cli_json(state_dir, "guest", "status", "c1", timeout=30)
        assert isinstance(listing, list) and listing[0]["busy"] is True
        assert isinstance(st, dict) and st["busy"] is True and st["state"] == "running"
        assert st["run_state"] is None and st["heartbeat"] is not None
        await host.disconnect()
    st = cli_json(state_dir, "guest", "status", "c1")
    assert isinstance(st, dict) and st["busy"] is False and st["run_state"] == "running"
