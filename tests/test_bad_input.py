"""Bad input, tried systematically.

Every command and Python entry point is fed bad names, sizes, percentages, unknown guests,
cloud VMs and tenants, unusable state directories and foreign state databases. Each must be
refused with exit code 2 (``BadInputError``) and one line on stderr, with ``--json`` too, and
change nothing: no store rows, files, QEMU processes, regions (memfds) or /dev/shm files.
No guest is booted: an "existing" guest or cloud VM is a store row without a QEMU, which is
all the checks before a lock or a process may look at.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from vmbeam_kvm import (
    Accel,
    BadInputError,
    Host,
    MigrationMode,
    MigrationOptions,
    Settings,
    UnknownGuestError,
)
from vmbeam_kvm.cli import main as cli_main
from vmbeam_kvm.cloudvm import ROOT_PORT_WINDOW, CloudVMRecord, CloudVMState
from vmbeam_kvm.config import check_lab_network
from vmbeam_kvm.host import MIN_MEMORY, check_guest_memory, mem_available
from vmbeam_kvm.qemu.machine import RamBackend
from vmbeam_kvm.store import GuestRecord, GuestState, Store
from vmbeam_kvm.units import (
    MAX_SIZE,
    NAME_MAX,
    PAGE_SIZE,
    check_name,
    parse_percent,
    parse_size,
    valid_name,
)

from .conftest import CLI, REPO, qemu_pids, run_cli

F = TypeVar("F", bound=Callable[..., Any])
GiB = 1 << 30
AVAIL_G = mem_available() >> 30
TOO_BIG = f"{AVAIL_G + 2}G"  # more than this host has free
WINDOW = parse_size(ROOT_PORT_WINDOW)
# No example database: each run stands on its own (failures print their example).
FAST = hsettings(deadline=None, max_examples=300, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------- helpers
def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{text}"
    assert lines[0].startswith("vmbeam-kvm: error: ") and "Traceback" not in text
    return lines[0]


def memfds() -> set[str]:
    """This process's memfds (regions it created and still holds)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:"):
            out.add(f"{fd}:{target}")
    return out


def snapshot(state_dir: Path) -> dict[str, Any]:
    """Everything a refused request must leave as it was."""
    rows: dict[str, Any] = {}
    db = state_dir / "state.db"
    if db.is_file() and not db.read_bytes()[:16].startswith(b"SQLite format 3"):
        rows["<bytes>"] = hashlib.sha256(db.read_bytes()).hexdigest()
    elif db.is_file():
        con = sqlite3.connect(db)
        try:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master "
                                                "WHERE type='table'")]
            for t in tables:
                rows[t] = sorted(repr(tuple(r)) for r in con.execute(f'SELECT * FROM "{t}"'))
        finally:
            con.close()
    files = (sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*")
                    if not p.name.startswith("state.db-"))  # WAL files come and go
             if state_dir.is_dir() else None)
    return {"rows": rows, "files": files, "qemu": qemu_pids(str(state_dir)),
            "shm": sorted(os.listdir("/dev/shm")), "memfds": memfds()}


def seed(state_dir: Path) -> None:
    """An existing guest on this host (g1), one in a cloud VM (g2) and that cloud VM (l1x,
    stopped), as rows only: bad arguments for them are refused before any process is used."""
    store = Store(state_dir)
    try:
        common: dict[str, Any] = {"image": "test", "memory": 64 << 20, "touch": 70,
                                  "accel": "tcg", "qemu": "qemu-system-x86_64",
                                  "state": GuestState.RUNNING}
        store.add_guest(GuestRecord(name="g1", **common))
        store.add_guest(GuestRecord(name="g2", cloud_vm="l1x", tenant="tenant-a", **common))
        store.add_cloud_vm(CloudVMRecord(name="l1x", tenant="tenant-a", memory=GiB, cpus=1,
                                         state=CloudVMState.STOPPED))
    finally:
        store.close()


def runner() -> CliRunner:
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def invoke(state_dir: Path, args: list[str], env: dict[str, str] | None = None) -> Result:
    return runner().invoke(cli_main, args, env={"VMBEAM_STATE_DIR": str(state_dir),
                                                "VMBEAM_ACCEL": "tcg", **(env or {})})


def assert_refused(res: Result, as_json: bool) -> str:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert isinstance(res.exception, SystemExit)  # not a traceback
    line = one_line(res.stderr)
    if as_json:
        doc = json.loads(res.stdout)
        assert doc["exit_code"] == 2 and doc["error"] and "\n" not in doc["error"]
    else:
        assert res.stdout == ""
    return line


@pytest.fixture
def seeded(state_dir: Path) -> Path:
    seed(state_dir)
    return state_dir


def examples(*values: Any) -> Callable[[F], F]:
    """Many ``@example``s at once (a tuple: one example's arguments)."""
    def deco(fn: F) -> F:
        for v in values:
            fn = example(*(v if isinstance(v, tuple) else (v,)))(fn)
        return fn
    return deco


# --------------------------------------------------------- property: pure validators
NAME_EDGES = ["", "a/b", "a b", "ünïcödé", "x" * 300, "-x", "--json", ".hidden", "..",
              "abc\n", "a\x00b", "\udcff", "a" * NAME_MAX, "a" * (NAME_MAX + 1), "\u0663"]


@FAST
@given(st.text() | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", fullmatch=True))
@examples(*NAME_EDGES)
def test_names_are_accepted_or_refused(name: str) -> None:
    try:
        assert check_name(name) == name
    except BadInputError as exc:
        assert not valid_name(name) and len(str(exc).splitlines()) == 1
        return
    # What is accepted is safe as a file name, a tap/QEMU id and a command-line argument.
    assert valid_name(name) and 1 <= len(name) <= NAME_MAX and name.isascii()
    assert "/" not in name and not name.startswith(("-", ".")) and name.isprintable()
    assert not any(c.isspace() for c in name)


@FAST
@given(st.text(max_size=80)
       | st.from_regex(r"\s?[0-9]{1,30}(\.[0-9]{1,8})?\s?([kKmMgGtT](i?[bB])?|[bB])?\s?",
                       fullmatch=True)
       | st.integers().map(str) | st.integers())
@examples(-(10 ** 5000), 1 << 63, (1 << 63) - 1, "9223372036854775808", "8388608T",
          "0", "-1G", "1000001", "1.5K", "12Q", "", "9" * 400, "1e9", "1iB", "\u0661G",
          "inf", "0x10", " 1 G ", "1.5GiB", "7b")
def test_parse_size_returns_bytes_or_refuses(text: str | int) -> None:
    try:
        size = parse_size(text)
    except BadInputError as exc:
        assert len(str(exc).splitlines()) == 1
        return
    assert isinstance(size, int) and 0 <= size < 1 << 63  # fits SQLite and QEMU's int64


@FAST
@given(st.integers(min_value=0, max_value=10 ** 30), st.sampled_from(
    [("", 1), ("B", 1), ("K", 1 << 10), ("k", 1 << 10), ("M", 1 << 20), ("MiB", 1 << 20),
     ("G", GiB), ("GB", GiB), ("T", 1 << 40)]))
def test_parse_size_is_exact(n: int, suffix: tuple[str, int]) -> None:
    # Whole numbers read back exactly (no float rounding), up to what int64 holds.
    if n * suffix[1] <= MAX_SIZE:
        assert parse_size(f"{n}{suffix[0]}") == n * suffix[1]
    else:
        with pytest.raises(BadInputError, match="must be 0 to"):
            parse_size(f"{n}{suffix[0]}")


@FAST
@given(st.integers(min_value=0, max_value=10 ** 12),
       st.integers(min_value=0, max_value=10 ** 6 - 1))
def test_parse_size_decimals_are_exact_or_refused(whole: int, frac: int) -> None:
    text, exact = f"{whole}.{frac:06d}K", (whole * 10 ** 6 + frac) * 1024
    if exact % 10 ** 6:
        with pytest.raises(BadInputError, match="whole number of bytes"):
            parse_size(text)
    else:
        assert parse_size(text) == exact // 10 ** 6


@FAST
@given(st.text(max_size=20) | st.integers().map(str) | st.integers().map(lambda i: f"{i}%")
       | st.integers())
@examples("96%", "-1", "70.5%", "%", "9" * 5000, 10 ** 5000)
def test_parse_percent_in_range_or_refused(text: str | int) -> None:
    try:
        pct = parse_percent(text)
    except BadInputError as exc:
        assert len(str(exc).splitlines()) == 1
        return
    assert 0 <= pct <= 95


@FAST
@given(st.integers(min_value=-(1 << 70), max_value=1 << 70)
       | st.integers(min_value=0, max_value=64 * GiB).map(lambda n: n - n % PAGE_SIZE),
       st.booleans())
@examples((0, False), (-4096, False), (1000001, False), (MIN_MEMORY - 4096, False),
          (WINDOW, True), (WINDOW // 2 - PAGE_SIZE, True), (WINDOW // 2, True))
def test_guest_memory_checked(size: int, in_cloud_vm: bool) -> None:
    avail = mem_available()
    if abs(size - avail) < GiB:
        return  # MemAvailable moves while other tests run: no verdict this close to it
    region = 1 << (size + PAGE_SIZE - 1).bit_length() if size > 0 else 0
    ok = (size % PAGE_SIZE == 0 and MIN_MEMORY <= size <= avail
          and (not in_cloud_vm or region <= WINDOW))
    if ok:
        assert check_guest_memory(size, in_cloud_vm=in_cloud_vm) == size
    else:
        with pytest.raises(BadInputError):
            check_guest_memory(size, in_cloud_vm=in_cloud_vm)


@pytest.mark.parametrize("value", [True, 1.5, None, b"64M", [64]])
def test_units_refuse_other_types(value: Any) -> None:
    with pytest.raises(BadInputError):
        parse_size(value)
    with pytest.raises(BadInputError):
        parse_percent(value)


@pytest.mark.parametrize(("ns", "subnet"), [
    ("a/b", "10.203.0.0/24"), ("", "10.203.0.0/24"), ("-x", "10.203.0.0/24"),
    ("x" * 65, "10.203.0.0/24"), ("lab", "bogus"), ("lab", "10.0.0.0/33"),
    ("lab", "10.0.0.5/24"), ("lab", "10.0.0.0/28"), ("lab", "::1/64")])
def test_lab_network_checked(ns: str, subnet: str) -> None:
    with pytest.raises(BadInputError):
        check_lab_network(ns, subnet)


def test_settings_from_a_bad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMBEAM_ACCEL", "bogus")
    with pytest.raises(BadInputError, match="VMBEAM_ACCEL"):
        Settings()
    monkeypatch.setenv("VMBEAM_ACCEL", "")  # empty means unset
    monkeypatch.setenv("VMBEAM_STATE_DIR", "")
    s = Settings()
    assert s.accel is Accel.AUTO and s.state_dir == Path("/var/lib/vmbeam-kvm")


# ----------------------------------------------------------- property: the CLI, in-process
@hsettings(FAST, max_examples=40)
@given(st.text(max_size=64))
def test_any_name_is_a_clean_refusal(seeded: Path, name: str) -> None:
    """No guest of a generated name exists: status refuses every one, and start (with a QEMU
    that does not exist) too, bad names for their name."""
    state_dir = seeded
    if name in ("g1", "g2"):
        return
    before = snapshot(state_dir)
    line = assert_refused(invoke(state_dir, ["guest", "status", "--json", "--", name]), True)
    assert "no guest named" in line
    res = invoke(state_dir, ["guest", "start", "--memory", "64M", "--qemu", "/no/such/qemu",
                             "--", name])
    line = assert_refused(res, False)
    assert ("invalid name" in line) != valid_name(name), line
    assert snapshot(state_dir) == before


# -------------------------------------------------------------- the CLI: every command
GUEST_START = ["guest", "start"]
CLI_CASES: list[tuple[str, list[str], dict[str, str]]] = [
    # names
    *[(f"start name {n!r}", [*GUEST_START, "--memory", "64M", "--", n], {})
      for n in NAME_EDGES if n not in ("a" * NAME_MAX,)],
    ("start leading dash", [*GUEST_START, "-x", "--memory", "64M"], {}),
    # sizes
    *[(f"start memory {m!r}", [*GUEST_START, "g", "--memory", m], {})
      for m in ["0", "-1G", "1000001", "1.5K", "12Q", "", "9" * 400, "1e9", TOO_BIG, "4T"]],
    ("start too big for a cloud VM",
     [*GUEST_START, "g", "--memory", ROOT_PORT_WINDOW, "--cloud-vm", "l1x"], {}),
    # touch, image, QEMU
    *[(f"start touch {t!r}", [*GUEST_START, "g", "--memory", "64M", "--touch", t], {})
      for t in ["96%", "-1", "150", "70.5%", "abc", "%", "9" * 5000]],
    ("start image", [*GUEST_START, "g", "--memory", "64M", "--image", "bogus"], {}),
    ("start qemu", [*GUEST_START, "g", "--memory", "64M", "--qemu", "/no/such/qemu"], {}),
    ("start accel", ["--accel", "bogus", *GUEST_START, "g", "--memory", "64M"], {}),
    # unknown and unusable cloud VMs, duplicates
    ("start unknown cloud VM", [*GUEST_START, "g", "--memory", "64M", "--cloud-vm", "nosuch"],
     {}),
    ("start stopped cloud VM", [*GUEST_START, "g", "--memory", "64M", "--cloud-vm", "l1x"], {}),
    ("start cloud VM + qemu",
     [*GUEST_START, "g", "--memory", "64M", "--cloud-vm", "l1x", "--qemu", "qemu"], {}),
    ("start duplicate", [*GUEST_START, "g1", "--memory", "64M"], {}),
    # status / stop of unknown guests
    *[(f"{cmd} {n!r}", ["guest", cmd, "--", n], {}) for cmd in ("status", "stop", "settle")
      for n in ["ghost", "a/b", "../g1", "x" * 300, "", "\udcff"]],
    ("settle running", ["guest", "settle", "g1"], {}),
    ("settle running in cloud VM", ["guest", "settle", "g2"], {}),
    ("status leading dash", ["guest", "status", "-x"], {}),
    # migrate
    ("migrate nowhere", ["migrate", "g1"], {}),
    ("migrate both", ["migrate", "g1", "--local", "--to", "l1x"], {}),
    ("migrate unknown", ["migrate", "ghost", "--local"], {}),
    ("migrate slash", ["migrate", "a/b", "--local"], {}),
    ("migrate dots", ["migrate", "../g1", "--local"], {}),
    ("migrate unknown to", ["migrate", "ghost", "--to", "nosuch"], {}),
    ("migrate to nosuch", ["migrate", "g2", "--to", "nosuch"], {}),
    ("migrate local guest --to", ["migrate", "g1", "--to", "l1x"], {}),
    ("migrate cloud guest --local", ["migrate", "g2", "--local"], {}),
    ("migrate to stopped", ["migrate", "g2", "--to", "l1x"], {}),
    ("migrate --to cpr", ["migrate", "g2", "--to", "l1x", "--mode", "cpr-transfer"], {}),
    ("migrate --to timeout", ["migrate", "g2", "--to", "l1x", "--timeout", "5"], {}),
    *[(f"migrate timeout {t}", ["migrate", "g1", "--local", "--timeout", t], {})
      for t in ["-5", "0", "nan", "inf", "soon"]],
    ("migrate qemu", ["migrate", "g1", "--local", "--qemu", "/no/such/qemu"], {}),
    ("migrate mode", ["migrate", "g1", "--local", "--mode", "teleport"], {}),
    ("migrate --to prefault", ["migrate", "g2", "--to", "l1x", "--prefault"], {}),
    ("migrate precopy prefault", ["migrate", "g1", "--local", "--mode", "precopy",
                                  "--prefault"], {}),
    *[(f"migrate tail window {w}", ["migrate", "g1", "--local", "--tail-window", w], {})
      for w in ["-1", "11", "nan", "inf", "long"]],
    ("guest start hugepages odd size", ["guest", "start", "g", "--memory", "3M",
                                        "--hugepages"], {}),
    ("guest start hugepages cloud", ["guest", "start", "g", "--memory", "64M",
                                     "--cloud-vm", "l1x", "--hugepages"], {}),
    # cloud VMs
    *[(f"cloud-vm start name {n!r}", ["cloud-vm", "start", "--tenant", "t", "--", n], {})
      for n in ["a/b", "a b", "ünï", "x" * 300, "", "twelve-chars", ".x"]],
    ("cloud-vm start duplicate", ["cloud-vm", "start", "l1x", "--tenant", "t"], {}),
    *[(f"cloud-vm start tenant {t!r}", ["cloud-vm", "start", "c1", "--tenant", t], {})
      for t in ["", "a b", "a/b", "x" * 300, "ünï"]],
    ("cloud-vm start no tenant", ["cloud-vm", "start", "c1"], {}),
    *[(f"cloud-vm start memory {m!r}", ["cloud-vm", "start", "c1", "--tenant", "t",
                                        "--memory", m], {})
      for m in ["0", "-2G", "100M", "1000001", "12Q", TOO_BIG]],
    *[(f"cloud-vm start cpus {c}", ["cloud-vm", "start", "c1", "--tenant", "t", "--cpus", c],
       {}) for c in ["0", "65", "two"]],
    ("cloud-vm start subnet", ["cloud-vm", "start", "c1", "--tenant", "t"],
     {"VMBEAM_LAB_SUBNET": "10.0.0.0/33"}),
    ("cloud-vm stop unknown", ["cloud-vm", "stop", "nosuch"], {}),
    # lab
    ("lab up subnet", ["lab", "up"], {"VMBEAM_LAB_SUBNET": "bogus"}),
    ("lab up small subnet", ["lab", "up"], {"VMBEAM_LAB_SUBNET": "10.0.0.0/28"}),
    ("lab up namespace", ["lab", "up"], {"VMBEAM_LAB_NS": "a/b"}),
    # bench
    *[(f"bench flat sizes {s!r}", ["bench", "flat", "--sizes", s], {})
      for s in ["", ",", "0", "128M,12Q", "128M,0", "1000001", "9" * 400, TOO_BIG]],
    ("bench flat touch", ["bench", "flat", "--sizes", "128M", "--touch", "200%"], {}),
    ("bench flat methods", ["bench", "flat", "--sizes", "128M", "--methods", "bogus"], {}),
    ("bench flat no methods", ["bench", "flat", "--sizes", "128M", "--methods", ","], {}),
    ("bench flat repeat", ["bench", "flat", "--sizes", "128M", "--repeat", "0"], {}),
    ("bench flat tail window", ["bench", "flat", "--sizes", "128M", "--tail-window", "nan"],
     {}),
    ("bench flat precopy max", ["bench", "flat", "--sizes", "128M", "--precopy-max", "12Q"],
     {}),
    ("bench flat hugepages odd", ["bench", "flat", "--sizes", "129M", "--hugepages"], {}),
    ("bench nested tail window", ["bench", "nested", "--sizes", "128M", "--tail-window",
                                  "-1"], {}),
    *[(f"bench flat cpus {c!r}", ["bench", "flat", "--sizes", "128M", "--cpus", c], {})
      for c in ["0", "65", "two", ","]],
    *[(f"bench flat disk size {d!r}", ["bench", "flat", "--sizes", "128M", "--disk-size", d],
       {}) for d in ["12Q", "1.5K", "", "99999T"]],
    ("bench flat disk fill", ["bench", "flat", "--sizes", "128M", "--disk-size", "64M",
                              "--disk-fill", "200%"], {}),
    ("bench nested cpus", ["bench", "nested", "--sizes", "128M", "--cpus", "0"], {}),
    ("bench flat plot dir", ["bench", "flat", "--sizes", "128M", "--plot", "/tmp"], {}),
    ("bench flat plot missing", ["bench", "flat", "--sizes", "128M", "--plot",
                                 "/no/such/dir/x.png"], {}),
    *[(f"bench nested sizes {s!r}", ["bench", "nested", "--sizes", s], {})
      for s in ["", "0", ROOT_PORT_WINDOW, "12Q"]],
    ("bench nested subnet", ["bench", "nested", "--sizes", "128M"],
     {"VMBEAM_LAB_SUBNET": "10.0.0.0/28"}),
    # the environment
    ("env migration tls", ["guest", "list"], {"VMBEAM_MIGRATION_TLS": "bogus"}),
    ("env accel", ["region", "list"], {"VMBEAM_ACCEL": "bogus"}),
    ("empty state dir", ["--state-dir", "", "guest", "list"], {}),
    ("no such command", ["teleport"], {}),
]


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
@pytest.mark.parametrize(("args", "env"), [(a, e) for _, a, e in CLI_CASES],
                         ids=[i for i, _, _ in CLI_CASES])
def test_cli_refuses(seeded: Path, args: list[str], env: dict[str, str],
                     as_json: bool) -> None:
    before = snapshot(seeded)
    if as_json:  # an option, so before a "--"
        at = args.index("--") if "--" in args else len(args)
        args = [*args[:at], "--json", *args[at:]]
    assert_refused(invoke(seeded, args, env), as_json)
    assert snapshot(seeded) == before


# --------------------------------------------------------------- state directories
@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "somefile"
    f.write_text("not a directory\n")
    return f


STATE_COMMANDS = [["guest", "list"], ["region", "list"], ["cloud-vm", "list"], ["lab", "up"],
                  ["guest", "start", "g", "--memory", "64M"], ["guest", "status", "g"],
                  ["migrate", "g", "--local"], ["bench", "flat", "--sizes", "128M"]]


@pytest.mark.parametrize("args", STATE_COMMANDS, ids=lambda a: " ".join(a[:2]))
@pytest.mark.parametrize("where", ["under a file", "a file", "db is a dir"])
def test_unusable_state_dir(tmp_path: Path, a_file: Path, args: list[str], where: str) -> None:
    # Tests run as root, which permissions do not stop: these fail for root too.
    state = {"under a file": a_file / "sub", "a file": a_file,
             "db is a dir": tmp_path / "st"}[where]
    if where == "db is a dir":
        (state / "state.db").mkdir(parents=True)
    before = sorted(tmp_path.rglob("*")), a_file.read_text()
    res = invoke(state, [*args, "--json"])
    line = assert_refused(res, True)
    assert str(state) in line
    assert (sorted(tmp_path.rglob("*")), a_file.read_text()) == before
    assert qemu_pids(str(tmp_path)) == []


def test_missing_state_dir_is_created(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    res = invoke(state, ["guest", "list", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == []
    assert (state / "state.db").is_file()


def first_release_store(path: Path) -> None:
    """A store as the first release made it: no cloud-VM columns, tables or audit log."""
    path.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path / "state.db")
    con.executescript("""
        CREATE TABLE guests (
            name TEXT PRIMARY KEY, image TEXT, memory INTEGER, touch INTEGER, accel TEXT,
            qemu TEXT, state TEXT, pid INTEGER, pid_start INTEGER, qmp_path TEXT,
            serial_path TEXT, log_path TEXT, region_id TEXT, backend TEXT, instance INTEGER,
            created_at REAL);
        CREATE TABLE migrations (
            id INTEGER PRIMARY KEY AUTOINCREMENT, guest TEXT, mode TEXT, phase TEXT,
            src_pid INTEGER, src_start INTEGER, dst_pid INTEGER, dst_start INTEGER,
            dst_qmp TEXT, dst_serial TEXT, dst_log TEXT, dst_instance INTEGER, started_at REAL,
            ended_at REAL, error TEXT, result TEXT);
        INSERT INTO guests VALUES ('old', 'test', 67108864, 70, 'tcg', 'qemu', 'stopped', 0, 0,
                                   '', '', '', '', 'region', 0, 1.0);
        INSERT INTO migrations (guest, mode, phase) VALUES ('old', 'zero-copy', 'done');
    """)
    con.commit()
    con.close()


def test_store_of_the_first_release_is_migrated(state_dir: Path) -> None:
    first_release_store(state_dir)
    res = invoke(state_dir, ["region", "list", "--json"])
    assert res.exit_code == 0, res.stderr
    store = Store(state_dir)
    try:
        (rec,) = store.guests()
        assert (rec.name, rec.memory, rec.cloud_vm, rec.tenant) == ("old", 64 << 20, "", "")
        assert rec.cpus == 1  # guests of earlier releases had one vCPU
        assert store.migrations("old")[0].src_cloud_vm == ""
        assert store.cloud_vms() == [] and store.regions() == []
    finally:
        store.close()
    before = snapshot(state_dir)
    Store(state_dir).close()  # a current store opens without a change
    assert snapshot(state_dir) == before


@pytest.mark.parametrize("kind", ["garbage", "foreign sqlite", "unknown older schema"])
@pytest.mark.parametrize("args", STATE_COMMANDS[:6], ids=lambda a: " ".join(a[:2]))
def test_unusable_state_database(state_dir: Path, kind: str, args: list[str]) -> None:
    db = state_dir / "state.db"
    if kind == "garbage":
        db.write_bytes(hashlib.sha256(b"x").digest() * 200)
    else:
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE foo (a)" if kind == "foreign sqlite"
                    else "CREATE TABLE guests (name TEXT PRIMARY KEY, state TEXT)")
        con.commit()
        con.close()
    data, files = db.read_bytes(), sorted(state_dir.iterdir())
    line = assert_refused(invoke(state_dir, [*args, "--json"]), True)
    assert str(db) in line and "move it aside" in line
    assert db.read_bytes() == data and sorted(state_dir.iterdir()) == files


# ----------------------------------------------------------------------- the Python API
@pytest.fixture
async def api_host(seeded: Path) -> Any:
    async with Host(Settings(state_dir=seeded, accel=Accel.TCG)) as h:
        yield h


START_BAD: list[tuple[Any, Any, dict[str, Any]]] = [
    *[(n, "64M", {}) for n in NAME_EDGES if n != "a" * NAME_MAX],
    (None, "64M", {}), (7, "64M", {}),
    *[("g", m, {}) for m in [0, -4096, 1000001, "1.5K", "12Q", 1.5, True, None, TOO_BIG]],
    ("g", "64M", {"touch": 96}), ("g", "64M", {"touch": -1}), ("g", "64M", {"touch": 7.5}),
    ("g", "64M", {"image": "bogus"}), ("g", "64M", {"qemu": "/no/such/qemu"}),
    ("g1", "64M", {}),
    ("g", "64M", {"cloud_vm": "nosuch"}), ("g", "64M", {"cloud_vm": "l1x"}),
    ("g", ROOT_PORT_WINDOW, {"cloud_vm": "l1x"}),
    ("g", "64M", {"cloud_vm": "l1x", "backend": RamBackend.MEMFD}),
    ("g", "3M", {"hugepages": True}), ("g", "64M", {"cloud_vm": "l1x", "hugepages": True}),
    ("g", "64M", {"hugepages": True, "backend": RamBackend.MEMFD}),
]


@pytest.mark.parametrize(("name", "memory", "kw"), START_BAD, ids=repr)
async def test_api_start_guest_refuses(api_host: Host, name: Any, memory: Any,
                                       kw: dict[str, Any]) -> None:
    before = snapshot(api_host.settings.state_dir)
    with pytest.raises(BadInputError):
        await api_host.start_guest(name, memory, **kw)
    assert snapshot(api_host.settings.state_dir) == before


@pytest.mark.parametrize(("name", "tenant", "memory", "cpus"), [
    ("a/b", "t", "2G", 2), ("averylongnam", "t", "2G", 2), ("", "t", "2G", 2),
    ("c1", "", "2G", 2), ("c1", "a b", "2G", 2), ("c1", "t", 0, 2), ("c1", "t", "100M", 2),
    ("c1", "t", "1000001", 2), ("c1", "t", TOO_BIG, 2), ("c1", "t", "2G", 0),
    ("c1", "t", "2G", 65), ("c1", "t", "2G", True), ("l1x", "t", "2G", 2)], ids=repr)
async def test_api_start_cloud_vm_refuses(api_host: Host, name: str, tenant: str,
                                          memory: Any, cpus: Any) -> None:
    before = snapshot(api_host.settings.state_dir)
    with pytest.raises(BadInputError):
        await api_host.start_cloud_vm(name, tenant, memory, cpus)
    assert snapshot(api_host.settings.state_dir) == before


@pytest.mark.parametrize(("name", "opts"), [
    ("ghost", MigrationOptions()), ("a/b", MigrationOptions()), ("../g1", MigrationOptions()),
    ("\udcff", MigrationOptions()), ("g2", MigrationOptions()),
    ("g1", MigrationOptions(timeout=-1)), ("g1", MigrationOptions(timeout=float("nan"))),
    ("g1", MigrationOptions(mode="teleport")),  # type: ignore[arg-type]
    ("g1", MigrationOptions(mode=MigrationMode.ZERO_COPY, qemu="/no/such/qemu")),
    ("g1", MigrationOptions(mode=MigrationMode.PRECOPY, prefault=True)),
    *[("g1", MigrationOptions(tail_window=w))  # type: ignore[arg-type]
      for w in (-1, 11, float("nan"), float("inf"), "1", True)]], ids=repr)
async def test_api_migrate_refuses(api_host: Host, name: str, opts: MigrationOptions) -> None:
    before = snapshot(api_host.settings.state_dir)
    with pytest.raises(BadInputError):
        await api_host.migrate(name, opts)
    assert snapshot(api_host.settings.state_dir) == before  # no lock file either


@pytest.mark.parametrize("name", ["ghost", "a/b", "", "x" * 300, "\udcff"])
async def test_api_unknown_guest(api_host: Host, name: str) -> None:
    before = snapshot(api_host.settings.state_dir)
    with pytest.raises(UnknownGuestError):
        await api_host.status(name)
    with pytest.raises(UnknownGuestError):
        await api_host.stop_guest(name)
    with pytest.raises(UnknownGuestError):
        await api_host.guest(name)
    if name != "ghost":  # not a file name: never a guest's, and no path outside locks/
        with pytest.raises(UnknownGuestError), api_host.store.lock_guest(name):
            pass
    with pytest.raises(BadInputError):
        await api_host.cloud.stop_cloud_vm(name)
    assert snapshot(api_host.settings.state_dir) == before


async def test_api_state_dir_too_long_for_sockets(tmp_path: Path) -> None:
    state = tmp_path / ("s" * max(1, 100 - len(str(tmp_path))))
    async with Host(Settings(state_dir=state, accel=Accel.TCG)) as host:
        before = snapshot(state)
        with pytest.raises(BadInputError, match="too long for a unix socket"):
            await host.start_guest("g", "64M")
        with pytest.raises(BadInputError, match="too long for a unix socket"):
            await host.start_cloud_vm("c1", "t")
        assert snapshot(state) == before


async def test_api_unusable_state_dir(a_file: Path) -> None:
    for state in (a_file / "sub", a_file):
        with pytest.raises(BadInputError, match="not a directory"):
            async with Host(Settings(state_dir=state, accel=Accel.TCG)):
                pass
    assert not (a_file.parent / "sub").exists()


# ------------------------------------------------------------------ end to end, subprocess
@pytest.mark.parametrize(("args", "env", "expect"), [
    (["guest", "start", "a/b", "--memory", "64M"], {}, "invalid name"),
    (["guest", "start", "-x", "--memory", "64M"], {}, "No such option"),
    (["guest", "start", "g", "--memory", "9" * 400], {}, "invalid size"),
    (["migrate", "a/b", "--local"], {}, "no guest named"),
    (["bench", "flat", "--sizes", "128M,0"], {}, "below the minimum"),
    (["guest", "list"], {"VMBEAM_MIGRATION_TLS": "bogus"}, "VMBEAM_MIGRATION_TLS"),
], ids=lambda v: str(v)[:30])
def test_end_to_end(state_dir: Path, args: list[str], env: dict[str, str],
                    expect: str) -> None:
    for as_json in (False, True):
        proc = run_cli(state_dir, *args, *(["--json"] if as_json else []), env=env,
                       timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert expect in one_line(proc.stderr)
        if as_json:
            assert json.loads(proc.stdout)["exit_code"] == 2
    assert qemu_pids(str(state_dir)) == []
    assert not (state_dir / "state.db").exists() or snapshot(state_dir)["rows"]["guests"] == []


def test_end_to_end_undecodable_name_and_bad_state(state_dir: Path, a_file: Path) -> None:
    env = {**os.environ, "VMBEAM_STATE_DIR": str(state_dir), "VMBEAM_ACCEL": "tcg"}
    # argv bytes that are not UTF-8 reach Python as surrogates.
    proc = subprocess.run([*CLI, "guest", "status", os.fsdecode(b"\xff")], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "no guest named" in one_line(proc.stderr)
    proc = run_cli(a_file / "sub", "guest", "list", "--json", timeout=60)
    assert proc.returncode == 2 and "not a directory" in one_line(proc.stderr)
    assert json.loads(proc.stdout)["exit_code"] == 2
    (state_dir / "state.db").write_bytes(b"garbage" * 100)
    proc = run_cli(state_dir, "region", "list", timeout=60)
    assert proc.returncode == 2 and "move it aside" in one_line(proc.stderr)
    assert (state_dir / "state.db").read_bytes() == b"garbage" * 100
